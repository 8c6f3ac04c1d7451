"""Benchmark: ``collect_activations`` against a bare batched Hugging Face forward with hooks.

Both read the last-token residual stream entering every block (HF ``hidden_states[l]``) for the
same prompts, formatted and left-padded identically, with the same batch size. Each side runs in
its own subprocess so that peak RSS is measured separately; timings cover the reads only (model
loading is reported apart) and are taken in one process with the repeats of both sides interleaved,
so machine noise hits both alike. Prints the ratios lens-safety / baseline (targets: time <= 1.10,
peak RSS <= 1.20) and the max relative difference between the two results.

    python bench/activations.py [--model smollm2] [--n 80] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _prompts(n: int) -> list[str]:
    from lens_safety.prompts import PromptSet

    harmful, harmless = PromptSet.load("builtin:harmful"), PromptSet.load("builtin:harmless")
    mixed = [p for pair in zip(harmful.prompts, harmless.prompts, strict=False) for p in pair]
    return mixed[:n]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lens_safety_reader(args: argparse.Namespace):
    """Load the model with lens-safety; return (load seconds, function reading all prompts)."""
    from lens_safety import collect_activations, load_model

    start = time.perf_counter()
    model = load_model(args.model, device="cpu")
    load_s = time.perf_counter() - start
    prompts = _prompts(args.n)

    def read_all():
        return collect_activations(model, prompts, positions=(-1,), batch_size=args.batch_size).tensor[
            :, :, 0
        ]

    return load_s, read_all


def baseline_reader(args: argparse.Namespace):
    """Load vanilla transformers; return (load seconds, function reading all prompts with hooks)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lens_safety.chat import ChatFormatter
    from lens_safety.sources import resolve_spec

    start = time.perf_counter()
    path, _ = resolve_spec(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    chat = ChatFormatter(tokenizer)
    prompts = _prompts(args.n)
    layers = model.model.layers

    def read_all() -> torch.Tensor:
        chunks = []
        for i in range(0, len(prompts), args.batch_size):
            batch = chat.encode(prompts[i : i + args.batch_size])
            captured: dict[int, torch.Tensor] = {}

            def make(layer: int, captured: dict[int, torch.Tensor] = captured):
                def pre_hook(module, positional, keyword):
                    hidden = positional[0] if positional else keyword["hidden_states"]
                    captured[layer] = hidden[:, -1].float().clone()

                return pre_hook

            handles = [
                layer.register_forward_pre_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)
            ]
            try:
                with torch.inference_mode():
                    model(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids,
                        use_cache=False,
                    )
            finally:
                for handle in handles:
                    handle.remove()
            chunks.append(torch.stack([captured[i] for i in range(len(layers))], dim=1))
        return torch.cat(chunks)

    return load_s, read_all


def measure_memory(args: argparse.Namespace, out: str) -> dict[str, float]:
    """One side alone in this process: load, read once, report peak RSS."""
    import torch

    load_s, read_all = (lens_safety_reader if args.side == "lens-safety" else baseline_reader)(args)
    torch.save(read_all(), out)
    return {"load_s": load_s, "peak_rss_mb": _peak_rss_mb()}


def measure_time(args: argparse.Namespace) -> dict[str, float]:
    """Both sides in one process, repeats interleaved (noise hits both alike); best of repeats."""
    _, ours = lens_safety_reader(args)
    _, base = baseline_reader(args)
    times: dict[str, list[float]] = {"lens-safety": [], "baseline": []}
    for _ in range(args.repeats):
        for side, read_all in (("baseline", base), ("lens-safety", ours)):
            start = time.perf_counter()
            read_all()
            times[side].append(time.perf_counter() - start)
    return {side: min(values) for side, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--n", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", choices=["lens-safety", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(measure_memory(args, args.out)))
        return

    import torch

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("baseline", "lens-safety"):
            out = os.path.join(tmp, f"{side}.pt")
            cmd = [
                sys.executable,
                __file__,
                "--side",
                side,
                "--out",
                out,
                "--model",
                args.model,
                "--n",
                str(args.n),
                "--batch-size",
                str(args.batch_size),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[side]["tensor"] = torch.load(out, weights_only=True)
    read_s = measure_time(args)
    for side, seconds in read_s.items():
        results[side]["read_s"] = seconds
    ours, base = results["lens-safety"], results["baseline"]
    rel = float((ours["tensor"] - base["tensor"]).norm() / base["tensor"].norm())
    print(
        f"model={args.model} prompts={args.n} batch={args.batch_size} repeats={args.repeats} (best of repeats)"
    )
    print(f"{'':14}{'load s':>10}{'read s':>10}{'peak RSS MB':>14}")
    for side in ("baseline", "lens-safety"):
        r = results[side]
        print(f"{side:14}{r['load_s']:10.2f}{r['read_s']:10.2f}{r['peak_rss_mb']:14.0f}")
    time_ratio = ours["read_s"] / base["read_s"]
    rss_ratio = ours["peak_rss_mb"] / base["peak_rss_mb"]
    print(f"ratio time {time_ratio:.3f} (target <= 1.10)   ratio peak RSS {rss_ratio:.3f} (target <= 1.20)")
    print(f"max relative difference of the activations: {rel:.2e}")


if __name__ == "__main__":
    main()
