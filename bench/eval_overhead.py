"""Wall time of ``lens-safety eval`` against a bare batched Hugging Face ``generate`` of the same
completions, both as fresh processes measured in the same run.

    python bench/eval_overhead.py [--model smollm2-refusal] [--limit 64] [--max-new-tokens 48] [--threads 1]

Default: the first 64 prompts of ``builtin:harmful`` and of ``builtin:harmless``, 48 new tokens.

The baseline process loads the same local checkpoint with ``AutoModelForCausalLM``, formats the same
harmful and harmless prompts with the tokenizer's chat template, and decodes them greedily in
left-padded batches of ``--batch-size`` with the KV cache: the completions ``eval`` judges, and
nothing else. ``eval`` adds the bridge, the generation self-check, the judges, generation damage,
the benign cross-entropy and the intervals. Both processes include interpreter start and model load.
``eval``'s generation self-check is remembered on disk after its first pass, so it is run once
before the timing (a first-ever run pays it once). The bench also counts how many of ``eval``'s
completions equal the bare process's (decoded up to the first end-of-sequence token, stripped).
Runs are interleaved (``--repeats``) and the best of each side is kept. Prints both wall times and
both CPU times (user + system of the process), their ratios (target <= 1.3) and ``eval``'s own
breakdown: the CPU seconds of each side's parts (the bare process's imports and load, and its
generation; ``eval``'s parts from its ``timings_cpu``, the rest being interpreter start, imports,
model load and reading the self-check record), so the extra cost is attributed on a loaded machine
too. ``--threads N`` sets ``OMP_NUM_THREADS`` for both processes: on a
machine other jobs load, one thread per process keeps the CPU times free of the time idle threads
spend spinning at synchronisation points, so the CPU ratio measures work, not contention.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import textwrap
import time

TARGET_RATIO = 1.3

BARE = textwrap.dedent(
    """
    import json, sys, time, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from lens_safety.prompts import PromptSet
    from lens_safety.sources import resolve_spec

    spec, harmful, harmless, limit, tokens, batch = sys.argv[1:7]
    path = str(resolve_spec(spec)[0])
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    loaded = time.process_time()
    prompts = [p for s in (harmful, harmless) for p in PromptSet.load(s).head(int(limit))]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    eos.add(tokenizer.eos_token_id)
    completions = []
    for start in range(0, len(texts), int(batch)):
        enc = tokenizer(texts[start : start + int(batch)], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=int(tokens), do_sample=False, temperature=None,
                                 top_k=None, top_p=None, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            completions.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    cpu = {"imports and load": loaded, "generate": time.process_time() - loaded}
    print(json.dumps({"completions": completions, "cpu": cpu}))
    """
)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """``(wall seconds, CPU seconds, stdout)`` of one fresh process."""
    started, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv[:4])} … failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, _children_cpu() - cpu, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-refusal")
    parser.add_argument("--harmful", default="builtin:harmful")
    parser.add_argument("--harmless", default="builtin:harmless")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of both processes")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)

    from lens_safety.sources import resolve_spec

    resolve_spec(args.model)  # conversions and merges are cached once, outside the timing
    warm = "from lens_safety.models import load_model; from lens_safety.selfcheck import require_sound_generation; "
    warm += f"require_sound_generation(load_model({args.model!r}))"
    subprocess.run([sys.executable, "-c", warm], check=True, capture_output=True, env=env)
    common = [args.harmful, args.harmless, str(args.limit), str(args.max_new_tokens), str(args.batch_size)]
    bare = [sys.executable, "-c", BARE, args.model, *common]
    ours = [sys.executable, "-m", "lens_safety", "eval", args.model, "--harmful", args.harmful]
    ours += ["--harmless", args.harmless, "--limit", str(args.limit), "--max-new-tokens"]
    ours += [str(args.max_new_tokens), "--batch-size", str(args.batch_size), "--json"]
    walls: dict[str, list[float]] = {"bare": [], "eval": []}
    cpus: dict[str, list[float]] = {"bare": [], "eval": []}
    outputs: dict[str, str] = {}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for side, argv in (("bare", bare), ("eval", ours)):
            wall, cpu, outputs[side] = _timed(argv, env)
            walls[side].append(wall)
            cpus[side].append(cpu)
    report, bare_out = json.loads(outputs["eval"]), json.loads(outputs["bare"])
    ours_completions = [r["completion"] for r in report.get("records", [])]
    same = sum(a == b for a, b in zip(ours_completions, bare_out["completions"], strict=True))
    bare_s, eval_s = min(walls["bare"]), min(walls["eval"])
    bare_cpu, eval_cpu = min(cpus["bare"]), min(cpus["eval"])
    n = sum(report.get(k, {}).get("n", 0) for k in ("harmful_refusal_rate", "harmless_refusal_rate"))
    print(f"command: python bench/eval_overhead.py {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"model {args.model}, {n} prompts ({args.harmful} + {args.harmless}, first {args.limit} of each), "
        f"{args.max_new_tokens} new tokens, batch {args.batch_size}, best of {args.repeats}, "
        f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(
        f"cpu cores {os.cpu_count()}; load average (1, 5, 15 min) before {load_before}, "
        f"after {os.getloadavg()}"
    )
    print(f"completions equal to the bare process's: {same}/{len(ours_completions)}")
    print(f"bare HF generate process: wall {bare_s:7.1f} s, cpu {bare_cpu:7.1f} s")
    for name, value in bare_out["cpu"].items():
        print(f"  bare {name}: cpu {value:.1f} s (last run)")
    print(f"lens-safety eval process: wall {eval_s:7.1f} s, cpu {eval_cpu:7.1f} s")
    walls_eval, cpu_eval = report.get("timings") or {}, report.get("timings_cpu") or {}
    for name, value in cpu_eval.items():
        print(f"  eval {name}: cpu {value:.1f} s, wall {walls_eval.get(name, float('nan')):.1f} s (last run)")
    if cpu_eval:
        rest = cpus["eval"][-1] - sum(cpu_eval.values())
        print(
            f"  eval outside evaluate_model (interpreter, imports, load, self-check record): cpu {rest:.1f} s"
        )
    for what, ratio in (("wall", eval_s / bare_s), ("cpu", eval_cpu / bare_cpu)):
        verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
        print(f"{what} ratio {ratio:.2f} (target <= {TARGET_RATIO}): {verdict}")


if __name__ == "__main__":
    main()
