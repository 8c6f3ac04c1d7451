"""Benchmark: ROSI apply + export (with and without the reload check) vs a plain ``save_pretrained``.

Run: ``python bench/export.py [--model smollm2] [--repeats 5]``. Both sides run in the same process
on the same model, interleaved (A B, then B A, ...) so that drifting machine load hits both alike.
Each timed write ends with ``os.sync()`` inside the timing: both sides then pay for the same bytes
reaching the disk, instead of whatever the page cache happened to absorb. The figure of merit is
the median over repeats of the per-repeat ratio ``export write / save_pretrained`` (target <= 1.2);
the verification (reload + two forward passes) is reported on top.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch


def synced(write: Callable[[], object]) -> float:
    """Seconds taken by ``write()`` followed by ``os.sync()``."""
    os.sync()
    start = time.perf_counter()
    write()
    os.sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=30.0)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from lens_safety.edits import rosi
    from lens_safety.export import export_edit
    from lens_safety.models import load_model

    model = load_model(args.model, device="cpu")
    vanilla = AutoModelForCausalLM.from_pretrained(str(model.hf_path), dtype=model.dtype)
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    spec = rosi(direction, args.alpha)
    plain, write, verify, ratios = [], [], [], []
    with tempfile.TemporaryDirectory(dir=model.hf_path.parent) as root:

        def save_plain(i: int) -> float:
            return synced(partial(vanilla.save_pretrained, Path(root) / f"plain{i}"))

        def save_edited(i: int) -> tuple[float, float]:
            results: list = []
            seconds = synced(lambda: results.append(export_edit(model, spec, Path(root) / f"edited{i}")))
            return seconds - results[0].verify_seconds, results[0].verify_seconds

        export_edit(model, spec, Path(root) / "warm-up")  # first-call costs out of the timings
        for i in range(args.repeats):
            if i % 2 == 0:  # alternate which side runs first
                plain_s = save_plain(i)
                write_s, verify_s = save_edited(i)
            else:
                write_s, verify_s = save_edited(i)
                plain_s = save_plain(i)
            plain.append(plain_s)
            write.append(write_s)
            verify.append(verify_s)
            ratios.append(write_s / plain_s)
    report = {
        "model": args.model,
        "repeats": args.repeats,
        "save_pretrained_s": [round(x, 3) for x in plain],
        "export_write_s": [round(x, 3) for x in write],
        "verify_s": [round(x, 3) for x in verify],
        "ratio_write_per_repeat": [round(x, 3) for x in ratios],
        "ratio_write_median": round(statistics.median(ratios), 3),
        "ratio_total_median": round(
            statistics.median((w + v) / p for w, v, p in zip(write, verify, plain, strict=True)), 3
        ),
        "target": "ratio_write_median <= 1.2",
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
