"""Benchmark: ROSI apply + export (with and without the reload check) vs a plain ``save_pretrained``.

Run: ``python bench/export.py [--model smollm2] [--repeats 2]``. Both sides run in the same process on
the same model; the ratio ``export / save_pretrained`` is the figure of merit (target <= 1.2 for the
write itself; the verification reloads the export and runs two forward passes on top).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=2)
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
    plain, total, write = [], [], []
    with tempfile.TemporaryDirectory() as root:
        for i in range(args.repeats):
            start = time.perf_counter()
            vanilla.save_pretrained(Path(root) / f"plain{i}")
            plain.append(time.perf_counter() - start)
            result = export_edit(model, spec, Path(root) / f"edited{i}")
            total.append(result.seconds)
            write.append(result.seconds - result.verify_seconds)
    report = {
        "model": args.model,
        "save_pretrained_s": statistics.median(plain),
        "export_total_s": statistics.median(total),
        "export_without_verification_s": statistics.median(write),
        "ratio_total": statistics.median(total) / statistics.median(plain),
        "ratio_without_verification": statistics.median(write) / statistics.median(plain),
        "max_abs_logit_diff": result.max_abs_logit_diff,
        "repeats": args.repeats,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
