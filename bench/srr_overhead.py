"""Measure SRR's best-of-N overhead: ranker time (features + scoring) over candidate generation time.

Usage (from the repository root; a ranker directory from ``lens-safety srr train``):

    python bench/srr_overhead.py RANKER_DIR [--n 8] [--max-new-tokens 48] [--prompts 6] [--threads 1]

For each prompt (alternating built-in harmful / harmless test prompts) it runs
:func:`lens_safety.srr.select` once, which times candidate generation and, separately, the one
feature pass (stopping at the ranker's layer) plus the ranker forward. Prints one JSON object with
per-prompt and total fractions; the total is ``sum(ranking seconds) / sum(generation seconds)``.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from lens_safety.models import load_model
from lens_safety.prompts import PromptSet
from lens_safety.srr.ranker import load_ranker, read_ranker_record
from lens_safety.srr.select import select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ranker_dir")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (1 is fastest on a busy machine)"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = read_ranker_record(args.ranker_dir)["base_model"]
    model = load_model(base["spec"], device=args.device)
    ranker = load_ranker(args.ranker_dir, model)
    harmful = PromptSet.load("builtin:harmful:test").prompts
    harmless = PromptSet.load("builtin:harmless:test").prompts
    prompts = [(harmful if i % 2 == 0 else harmless)[i // 2] for i in range(args.prompts)]
    select(model, ranker, prompts[0], n=2, max_new_tokens=4, seed=0)  # warm-up
    rows = []
    for i, prompt in enumerate(prompts):
        result = select(model, ranker, prompt, n=args.n, max_new_tokens=args.max_new_tokens, seed=i)
        rows.append(
            {
                "generation_seconds": result.generation_seconds,
                "ranking_seconds": result.ranking_seconds,
                "overhead_fraction": result.overhead_fraction,
                "n_unique": len(result.ranking),
            }
        )
    total = sum(r["ranking_seconds"] for r in rows) / sum(r["generation_seconds"] for r in rows)
    print(
        json.dumps(
            {
                "ranker_dir": args.ranker_dir,
                "layer": ranker.config.layer,
                "context": ranker.config.context,
                "n_parameters": ranker.n_parameters(),
                "n": args.n,
                "max_new_tokens": args.max_new_tokens,
                "threads": torch.get_num_threads(),
                "device": args.device,
                "overhead_fraction_total": total,
                "overhead_fraction_median": statistics.median(r["overhead_fraction"] for r in rows),
                "per_prompt": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
