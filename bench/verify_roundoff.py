"""Round-off of the export verification per dtype: what the logit comparison must tolerate, and what
it must catch.

For every tiny test architecture and every dtype (float32, bfloat16, float16) a random checkpoint
is saved in that dtype, loaded in it, ROSI-edited (alpha 5, a random unit direction, every
attention/MLP output) and exported without verification. Measured with logits computed in the
stored dtype and (for half precision) in float32, as max |logit diff| over the verification
prompts' real tokens:

* ``verify``: the reference vs a vanilla eager reload of the export (the quantity the
  verification bounds; same weights, different code paths): the in-memory edited bridge when
  computing in the model's dtype, the vanilla base plus the edit when computing in float32;
* ``kernel``: the vanilla eager reload vs a vanilla SDPA reload of the same export (a different
  attention kernel only: pure round-off; ``null`` where the architecture has no SDPA path);
* ``fault``: the in-memory model with ONE writer (the last block's MLP output) left unedited vs
  the reload (the smallest wrong export the check must reject).

Writes ``bench/results/verify_roundoff.json``. Usage: ``python bench/verify_roundoff.py``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DTYPES = ("float32", "bfloat16", "float16")


def _vanilla(path: Path, dtype: torch.dtype, attention: str, batch) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=attention).eval()
    with torch.inference_mode():
        return hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits.float()


def _errors(ours: torch.Tensor, eager: torch.Tensor, sdpa, faulty: torch.Tensor, mask) -> dict:
    return {
        "verify": float((ours - eager).abs()[mask].max()),
        "kernel": None if sdpa is None else float((sdpa - eager).abs()[mask].max()),
        "fault": float((faulty - eager).abs()[mask].max()),
        "max_abs_logit": float(eager.abs()[mask].max()),
    }


def measure(arch: str, dtype: str, root: Path, tokenizer_dir: Path) -> dict[str, dict]:
    from lens_safety.edits import applied_edit, rosi
    from lens_safety.export import VERIFY_PROMPTS, _vanilla_logits
    from lens_safety.export_files import write_shards
    from lens_safety.forward_pass import forward
    from lens_safety.models import load_model
    from lens_safety.testing import make_tiny_model

    src = make_tiny_model(arch, root / f"{arch}-{dtype}", tokenizer_dir, dtype=dtype)
    model = load_model(src, device="cpu", dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    spec = rosi(torch.randn(model.d_model, generator=generator, dtype=torch.float64), 5.0)
    out = root / f"{arch}-{dtype}-out"
    out.mkdir()
    write_shards(model, spec, out, untie=False, progress=False)
    for item in src.iterdir():
        if item.suffix != ".safetensors":
            (out / item.name).write_bytes(item.read_bytes())
    batch = model.chat.encode(list(VERIFY_PROMPTS))
    mask = batch.attention_mask.bool()
    last = f"blocks.{model.n_layers - 1}.mlp.out"
    names = [w.name for w in model.arch.writers_of("attn_out", "mlp_out") if w.name != last]
    partial = rosi(spec.direction, 5.0, targets=names)
    result = {}
    for compute in dict.fromkeys((model.dtype, torch.float32)):
        eager = _vanilla(out, compute, "eager", batch)
        try:
            sdpa: torch.Tensor | None = _vanilla(out, compute, "sdpa", batch)
        except ValueError:  # an architecture without an SDPA path (Gemma 2)
            sdpa = None
        if compute == model.dtype:
            with torch.inference_mode(), applied_edit(model, spec):
                ours = forward(model, batch).logits.float()
            with torch.inference_mode(), applied_edit(model, partial):
                faulty = forward(model, batch).logits.float()
        else:
            ours = _vanilla_logits(src, model, batch, compute, spec)
            faulty = _vanilla_logits(src, model, batch, compute, partial)
        result[str(compute).replace("torch.", "")] = _errors(ours, eager, sdpa, faulty, mask)
    return result


def main() -> None:
    from lens_safety.export import logit_bound
    from lens_safety.sources import resolve_spec
    from lens_safety.testing import TINY_ARCHITECTURES

    tokenizer_dir = resolve_spec("smollm2")[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in DTYPES:
            for arch in TINY_ARCHITECTURES:
                for compute, errors in measure(arch, dtype, Path(tmp), tokenizer_dir).items():
                    bound = logit_bound(getattr(torch, dtype)) if compute == "float32" else None
                    rows.append(
                        {"arch": arch, "stored": dtype, "computed": compute, **errors, "bound": bound}
                    )
                    print(json.dumps(rows[-1]), file=sys.stderr)
    groups = sorted({(r["stored"], r["computed"]) for r in rows})
    summary = {
        f"stored {stored}, computed {computed}": {
            "max_verify": max(
                r["verify"] for r in rows if (r["stored"], r["computed"]) == (stored, computed)
            ),
            "max_kernel": max(
                r["kernel"] or 0.0 for r in rows if (r["stored"], r["computed"]) == (stored, computed)
            ),
            "min_fault": min(r["fault"] for r in rows if (r["stored"], r["computed"]) == (stored, computed)),
        }
        for stored, computed in groups
    }
    record = {"torch": torch.__version__, "device": "cpu", "rows": rows, "summary": summary}
    target = Path(__file__).parent / "results" / "verify_roundoff.json"
    target.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
