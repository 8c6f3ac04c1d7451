"""SRR best-of-N overhead: what ranking adds to sampling the candidates, measured in one run.

Usage (from the repository root):

    python bench/srr_overhead.py [RANKER_DIR] [--model smollm2-refusal] [--n 8] [--max-new-tokens 48]
                                 [--prompts 6] [--repeats 2] [--threads 1]

Without ``RANKER_DIR`` an untrained ranker of the default shape at the default layer is used (its
weights do not change its cost). For each prompt (alternating built-in harmful / harmless test
prompts) and repeat, four runs with the SAME seed, in rotating order:

* ``plain`` — sample ``n`` candidates (the baseline every best-of-N pays);
* ``generated`` — :func:`lens_safety.srr.select` with features read WHILE sampling (hooks on the
  ranker's layer) + the ranker forward;
* ``generated_mean`` — the same, with the response states averaged (a float64 running sum over
  the sampled tokens' states, computed only for this mode);
* ``with_instruction`` — sample, then one separate feature pass (stopping at the ranker's layer)
  + the ranker forward.

Overhead of a mode = ``(sum of its total seconds - sum of plain seconds) / sum of plain seconds``,
so hook costs inside sampling count too; the target is <= 0.02 for the sampled contexts.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from lens_safety.evaluation.generation import generate
from lens_safety.models import load_model
from lens_safety.prompts import PromptSet
from lens_safety.srr.build import default_ranker_layer
from lens_safety.srr.ranker import RankerConfig, SafetyRanker, load_ranker, read_ranker_record
from lens_safety.srr.select import select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ranker_dir", nargs="?")
    parser.add_argument("--model", default="smollm2-refusal")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ranker_dir:
        model = load_model(read_ranker_record(args.ranker_dir)["base_model"]["spec"], device=args.device)
        ranker = load_ranker(args.ranker_dir, model)
    else:
        model = load_model(args.model, device=args.device)
        layer = default_ranker_layer(model)
        ranker = SafetyRanker(RankerConfig(d_input=model.d_model, layer=layer)).eval()
    rankers = {
        "generated": replace(ranker.config, context="generated"),
        "generated_mean": replace(ranker.config, context="generated_mean"),
        "with_instruction": replace(ranker.config, context="with_instruction"),
    }
    harmful = PromptSet.load("builtin:harmful:test").prompts
    harmless = PromptSet.load("builtin:harmless:test").prompts
    prompts = [(harmful if i % 2 == 0 else harmless)[i // 2] for i in range(args.prompts)]

    def plain(prompt: str, seed: int) -> float:
        start = time.perf_counter()
        generate(
            model,
            [prompt],
            max_new_tokens=args.max_new_tokens,
            do_sample=True,
            seed=seed,
            num_return_sequences=args.n,
            batch_size=1,
        )
        return time.perf_counter() - start

    def ranked(mode: str, prompt: str, seed: int) -> float:
        ranker.config = rankers[mode]
        start = time.perf_counter()
        select(model, ranker, prompt, n=args.n, max_new_tokens=args.max_new_tokens, seed=seed)
        return time.perf_counter() - start

    runs = {
        "plain": lambda p, s: plain(p, s),
        "generated": lambda p, s: ranked("generated", p, s),
        "generated_mean": lambda p, s: ranked("generated_mean", p, s),
        "with_instruction": lambda p, s: ranked("with_instruction", p, s),
    }
    for mode in runs:  # warm-up
        runs[mode](prompts[0], 0)
    totals = dict.fromkeys(runs, 0.0)
    order = list(runs)
    for repeat in range(args.repeats):
        for i, prompt in enumerate(prompts):
            for mode in order:
                totals[mode] += runs[mode](prompt, 1000 * repeat + i)
            order = order[1:] + order[:1]  # rotate which mode runs first
    overhead = {m: (totals[m] - totals["plain"]) / totals["plain"] for m in runs if m != "plain"}
    print(
        json.dumps(
            {
                "model": model.spec,
                "ranker": args.ranker_dir or "untrained, default shape",
                "ranker_parameters": ranker.n_parameters(),
                "layer": ranker.config.layer,
                "n": args.n,
                "max_new_tokens": args.max_new_tokens,
                "prompts": args.prompts,
                "repeats": args.repeats,
                "threads": torch.get_num_threads(),
                "seconds": {k: round(v, 3) for k, v in totals.items()},
                "overhead_fraction": {k: round(v, 4) for k, v in overhead.items()},
                "target": "overhead_fraction.generated and .generated_mean <= 0.02",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
