"""Weight-space interpolation of two organisms' LoRA adapters on the same base (WiSE-FT).

Two adapters ``0`` and ``1`` on the same base weights, modules and rank ``r``, with one merge scale
``s`` (``lora_alpha / r``), give for every adapted weight (HF layout, ``W: [d_out, d_in]``)

    W_t = (1 - t) (W + s B_0 A_0) + t (W + s B_1 A_1) = W + s [(1 - t) B_0 | t B_1] [A_0 ; A_1]

so the interpolated model is itself a LoRA adapter of rank ``2r``, ``B: [d_out, 2r]`` and
``A: [2r, d_in]``, with ``lora_alpha`` doubled so that the scale ``s`` is unchanged. Its weights are
exactly the straight line between the two merged models (the robust fine-tuning recipe of
Wortsman et al., 2022, WiSE-FT), not a line in the adapters' own parameters. Tensors are stored in
the parents' dtype; ``(1 - t) B_0`` and ``t B_1`` are rounded to it once.

The output is an adapter directory like a trained one (``adapter_model.safetensors``,
``adapter_config.json``, ``training.json``) that :func:`~lens_safety.organism.adapter.materialize_organism`
loads. Its ``training.json`` records ``t`` and both parents' records, including their training data,
so the held-out checks that cover the parents cover it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lens_safety.errors import LensSafetyError
from lens_safety.fsutil import staged_directory
from lens_safety.hashing import sha256_file
from lens_safety.organism.adapter import (
    LORA_A,
    LORA_B,
    checked_config,
    load_adapter_tensors,
    lora_scale,
    verify_adapter,
)
from lens_safety.organism.files import ADAPTER_FILE, CONFIG_FILE, TRAINING_FILE


def _check_compatible(
    records: tuple[dict[str, Any], dict[str, Any]],
    configs: tuple[dict[str, Any], dict[str, Any]],
    tensors: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    scales: tuple[float, float],
) -> None:
    """Both parents must share base weights, adapted modules and blocks, rank, scale and keys."""
    fix = "interpolate two adapters trained on the same base with the same rank, alpha and modules"
    checks = {
        "base weights": [r.get("base_weights_sha256") for r in records],
        "rank": [c["r"] for c in configs],
        "merge scale": list(scales),
        "target modules": [sorted(c["target_modules"]) for c in configs],
        "adapted blocks": [c.get("layers_to_transform") for c in configs],
        "tensor names": [sorted(t) for t in tensors],
    }
    for what, (a, b) in checks.items():
        if a != b:
            raise LensSafetyError(f"the two adapters differ in {what}", fix)
    if any(c.get("use_rslora") or c.get("use_dora") for c in configs):
        raise LensSafetyError("rsLoRA and DoRA adapters cannot be interpolated as a plain LoRA", fix)
    for key, a in tensors[0].items():
        if a.shape != tensors[1][key].shape:
            raise LensSafetyError(f"the two adapters differ in the shape of {key}", fix)


def interpolated_tensors(
    start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], t: float
) -> dict[str, torch.Tensor]:
    """``A = [A_0 ; A_1]`` and ``B = [(1 - t) B_0 | t B_1]`` for every adapted module (peft names)."""
    out: dict[str, torch.Tensor] = {}
    for key, a0 in start.items():
        if key.endswith(LORA_A):
            out[key] = torch.cat([a0, end[key]], dim=0).contiguous()
        elif key.endswith(LORA_B):
            b0, b1 = a0.to(torch.float32), end[key].to(torch.float32)
            out[key] = torch.cat([(1 - t) * b0, t * b1], dim=1).to(a0.dtype).contiguous()
        else:
            raise LensSafetyError(
                f"adapter tensor {key} is neither a LoRA A nor a LoRA B matrix",
                "interpolate plain LoRA adapters only",
            )
    return out


def interpolate_adapters(
    start: Path, end: Path, t: float, out: Path, names: tuple[str, str] | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Write the adapter of ``W_t = (1 - t) W_start + t W_end`` at ``out``; return its record.

    Args:
        start, end: adapter directories (each with its ``training.json``, hash checked).
        t: the interpolation weight in [0, 1]; 0 gives ``start``'s weights, 1 ``end``'s.
        out: the new adapter directory, written atomically; an existing one only with ``overwrite``.
        names: how the record names the parents (default: their directory names).
    """
    if not 0.0 <= t <= 1.0:
        raise LensSafetyError(f"interpolation weight t={t} is outside [0, 1]", "pass a t between 0 and 1")
    records = (verify_adapter(Path(start)), verify_adapter(Path(end)))
    configs = (checked_config(Path(start), records[0]), checked_config(Path(end), records[1]))
    scales = (lora_scale(configs[0]), lora_scale(configs[1]))
    tensors = (load_adapter_tensors(Path(start)), load_adapter_tensors(Path(end)))
    _check_compatible(records, configs, tensors, scales)
    from safetensors.torch import save_file

    rank, alpha = 2 * int(configs[0]["r"]), 2 * float(configs[0]["lora_alpha"])
    config = {**configs[0], "r": rank, "lora_alpha": alpha}
    labels = names or (Path(start).name, Path(end).name)
    with staged_directory(out, overwrite=overwrite) as tmp:
        save_file(interpolated_tensors(*tensors, t), str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        record = {
            "base_spec": records[0].get("base_spec"),
            "base_weights_sha256": records[0].get("base_weights_sha256"),
            "adapter_file": ADAPTER_FILE,
            "adapter_sha256": sha256_file(tmp / ADAPTER_FILE),
            "adapter_bytes": (tmp / ADAPTER_FILE).stat().st_size,
            "adapter_dtype": str(next(iter(tensors[0].values())).dtype).removeprefix("torch."),
            "config": {"rank": rank, "alpha": alpha},
            "interpolation": {
                "weights": "W_t = (1 - t) W_start + t W_end, as a rank-2r LoRA with the parents' scale",
                "t": t,
                "start": {"name": labels[0], "record": records[0]},
                "end": {"name": labels[1], "record": records[1]},
            },
        }
        (tmp / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record
