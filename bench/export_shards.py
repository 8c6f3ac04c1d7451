"""Benchmark: peak memory of exporting a multi-GB sharded checkpoint, against its largest shard.

Run: ``python bench/export_shards.py [--layers 14] [--shards 5] [--dir DIR]``. It writes a random
llama-shaped float32 checkpoint (width 2048, MLP 5632, grouped-query attention, untied embedding,
the embedded model's tokenizer; about 3.3 GB in 5 safetensors shards by default), one shard at a
time in a child process, then measures in a fresh child process that:

1. loads it with every weight offloaded to disk (``load_model(dir, device_map={"": "disk"})``), so
   the process holds no weights, and records the **baseline** RSS;
2. writes the ROSI export's shards (``lens_safety.export_files.write_shards``: copy each shard, rewrite
   the edited tensors) and records the **peak** RSS of that phase (``VmHWM``, reset before it);
3. runs the whole ``export_edit`` (shards + reload with vanilla transformers under the same
   placement + comparison with the in-memory edited model) and records its peak.

The figure of merit is ``(peak - baseline) / largest shard`` for each phase (target: <= 1.5).
Every file is removed afterwards (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTH, MLP, HEADS, KV_HEADS = 2048, 5632, 32, 4


def _kib(field: str) -> int:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def _tensor_shapes(layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    kv = WIDTH // HEADS * KV_HEADS
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, WIDTH))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (WIDTH,)),
            (p + "self_attn.q_proj.weight", (WIDTH, WIDTH)),
            (p + "self_attn.k_proj.weight", (kv, WIDTH)),
            (p + "self_attn.v_proj.weight", (kv, WIDTH)),
            (p + "self_attn.o_proj.weight", (WIDTH, WIDTH)),
            (p + "post_attention_layernorm.weight", (WIDTH,)),
            (p + "mlp.gate_proj.weight", (MLP, WIDTH)),
            (p + "mlp.up_proj.weight", (MLP, WIDTH)),
            (p + "mlp.down_proj.weight", (WIDTH, MLP)),
        ]
    return [*shapes, ("model.norm.weight", (WIDTH,)), ("lm_head.weight", (vocab, WIDTH))]


def generate(out: Path, layers: int, shards: int) -> None:
    """Write the random checkpoint shard by shard (one shard's tensors in memory at a time)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from lens_safety.sources import resolve_spec

    tokenizer_dir = resolve_spec("smollm2")[0]
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out.mkdir(parents=True)
    tokenizer.save_pretrained(str(out))
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    config.save_pretrained(str(out))
    shapes = _tensor_shapes(layers, len(tokenizer))
    total = sum(4 * math.prod(shape) for _, shape in shapes)
    per_shard = total / shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 4 * math.prod(shape)
        if groups[-1] and size + nbytes > per_shard and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for index, group in enumerate(groups):
        file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            name: torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
            for name, shape in group
        }
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index_record = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_record, indent=2))


def measure(model_dir: Path, work: Path) -> dict[str, object]:
    """Baseline, and peak RSS of the shard writing and of the whole export (see module docstring)."""
    import torch

    from lens_safety.edits import rosi
    from lens_safety.export import export_edit
    from lens_safety.export_files import write_shards
    from lens_safety.models import load_model

    model = load_model(model_dir, device_map={"": "disk"})
    spec = rosi(torch.randn(model.d_model, generator=torch.Generator().manual_seed(1)), 8.0)
    shards = sorted(model_dir.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    baseline = _kib("VmRSS")
    _reset_peak()
    started = time.perf_counter()
    staging = work / "shards-only"
    staging.mkdir()
    edited, _ = write_shards(model, spec, staging, untie=False, progress=False)
    write_peak, write_s = _kib("VmHWM"), time.perf_counter() - started
    shutil.rmtree(staging)
    baseline_export = _kib("VmRSS")
    _reset_peak()
    started = time.perf_counter()
    result = export_edit(model, spec, work / "export")
    export_peak, export_s = _kib("VmHWM"), time.perf_counter() - started
    return {
        "shards": [p.stat().st_size for p in shards],
        "largest_shard_bytes": largest,
        "edited_tensors": len(edited),
        "baseline_rss_bytes": baseline,
        "write_peak_rss_bytes": write_peak,
        "write_seconds": round(write_s, 1),
        "write_ratio": round((write_peak - baseline) / largest, 3),
        "export_baseline_rss_bytes": baseline_export,
        "export_peak_rss_bytes": export_peak,
        "export_seconds": round(export_s, 1),
        "verify_seconds": round(result.verify_seconds, 1),
        "export_ratio": round((export_peak - baseline_export) / largest, 3),
        "max_abs_logit_diff": result.max_abs_logit_diff,
        "reference": result.edit["verification"]["reference"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the checkpoint goes (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the export")
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(args.generate, args.layers, args.shards)
        return
    if args.measure:
        print(json.dumps(measure(args.measure, args.measure.parent)))
        return
    root = Path(tempfile.mkdtemp(prefix="export-shards-", dir=args.dir))
    script = [sys.executable, str(Path(__file__).resolve())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    try:
        subprocess.run(
            [
                *script,
                "--generate",
                str(root / "model"),
                "--layers",
                str(args.layers),
                "--shards",
                str(args.shards),
            ],
            check=True,
            env=env,
        )
        done = subprocess.run(
            [*script, "--measure", str(root / "model")], check=True, env=env, capture_output=True, text=True
        )
        record = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    gib = 1024**3
    report = {
        "checkpoint": f"llama-shaped float32, {args.layers} layers, width {WIDTH}, "
        f"{sum(record['shards']) / gib:.2f} GiB in {len(record['shards'])} shards",
        **record,
        "target": "(peak - baseline) / largest shard <= 1.5 for both phases",
        "met": max(record["write_ratio"], record["export_ratio"]) <= 1.5,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
