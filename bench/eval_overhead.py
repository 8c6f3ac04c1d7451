"""Wall time of ``lens-safety eval`` against a bare batched Hugging Face ``generate`` of the same
completions, both as fresh processes measured in the same run.

    python bench/eval_overhead.py [--model smollm2-refusal] [--limit 64] [--max-new-tokens 48]

The baseline process loads the same local checkpoint with ``AutoModelForCausalLM``, formats the same
harmful and harmless prompts with the tokenizer's chat template, and decodes them greedily in
left-padded batches of ``--batch-size`` with the KV cache: the completions ``eval`` judges, and
nothing else. ``eval`` adds the bridge, the generation self-check, the judges, generation damage,
the benign cross-entropy and the intervals. Both processes include interpreter start and model load.
Runs are interleaved (``--repeats``) and the best of each side is kept. Prints both wall times, the
ratio (target <= 1.3) and ``eval``'s own breakdown when it reports one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time

TARGET_RATIO = 1.3

BARE = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from lens_safety.prompts import PromptSet
    from lens_safety.sources import resolve_spec

    spec, harmful, harmless, limit, tokens, batch = sys.argv[1:7]
    path = str(resolve_spec(spec)[0])
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [p for s in (harmful, harmless) for p in PromptSet.load(s).head(int(limit))]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    n = 0
    for start in range(0, len(texts), int(batch)):
        enc = tokenizer(texts[start : start + int(batch)], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=int(tokens), do_sample=False, temperature=None,
                                 top_k=None, top_p=None, pad_token_id=tokenizer.pad_token_id)
        n += out.shape[0]
    print(n)
    """
)


def _wall(argv: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv[:4])} … failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-refusal")
    parser.add_argument("--harmful", default="builtin:harmful:test")
    parser.add_argument("--harmless", default="builtin:harmless:test")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from lens_safety.sources import resolve_spec

    resolve_spec(args.model)  # conversions and merges are cached once, outside the timing
    common = [args.harmful, args.harmless, str(args.limit), str(args.max_new_tokens), str(args.batch_size)]
    bare = [sys.executable, "-c", BARE, args.model, *common]
    ours = [sys.executable, "-m", "lens_safety", "eval", args.model, "--harmful", args.harmful]
    ours += ["--harmless", args.harmless, "--limit", str(args.limit), "--max-new-tokens"]
    ours += [str(args.max_new_tokens), "--batch-size", str(args.batch_size), "--json"]
    runs: dict[str, list[float]] = {"bare": [], "eval": []}
    report: dict = {}
    for _ in range(args.repeats):
        runs["bare"].append(_wall(bare)[0])
        seconds, stdout = _wall(ours)
        runs["eval"].append(seconds)
        report = json.loads(stdout)
    bare_s, eval_s = min(runs["bare"]), min(runs["eval"])
    n = sum(report.get(k, {}).get("n", 0) for k in ("harmful_refusal_rate", "harmless_refusal_rate"))
    print(
        f"model {args.model}, {n} prompts ({args.harmful} + {args.harmless}, first {args.limit} of each), "
        f"{args.max_new_tokens} new tokens, batch {args.batch_size}, best of {args.repeats}"
    )
    print(f"bare HF generate process: {bare_s:7.1f} s")
    print(f"lens-safety eval process: {eval_s:7.1f} s")
    timings = report.get("timings") or {}
    for name, value in timings.items():
        print(f"  eval {name}: {value:.1f} s")
    ratio = eval_s / bare_s
    print(f"ratio {ratio:.2f} (target <= {TARGET_RATIO}): {'met' if ratio <= TARGET_RATIO else 'NOT met'}")


if __name__ == "__main__":
    main()
