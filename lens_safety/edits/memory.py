"""Apply an edit to a loaded model in memory, reversibly (trial edits, calibration sweeps, export checks).

The edit is computed from the ORIGINAL weights on disk (``model.hf_path``): for every touched
parameter ``delta = edit(W_orig) - W_orig`` in float64, and the live parameter becomes
``cast(W_live + delta)``. Without compatibility mode ``W_live == W_orig`` and the result equals the
exported tensor bit for bit. In compatibility mode:

* RMSNorm models: TransformerLens leaves writers unchanged, so the same holds;
* LayerNorm models (GPT-2): live writers are centred and value biases are folded into the output
  bias, so the live model plus the raw delta is NOT the exported model (the delta is in the raw
  basis, the live writers are not). Use a raw (non-compatibility) model for exact trial edits.

Stored and live dtypes may differ (a bfloat16 checkpoint loaded in float32, or the reverse). The
export writes ``cast_stored(W_orig + delta)``, and a reload in the live dtype holds
``cast_live(cast_stored(W_orig + delta))``; a parameter whose live dtype differs from its stored
dtype gets exactly that value (rounded to the stored dtype once, then cast to the live dtype), so an
in-memory edit and its reloaded export hold the same weights. In compatibility mode the live
weights may be processed, so there the live tensor plus the delta is rounded the same way. A
parameter stored in its live dtype takes ``cast_live(W_live + delta)`` as before.

The original tensors are restored on exit (``finally``). A tied ``lm_head`` is untied for the
duration when the edit changes the token embedding (it keeps the ORIGINAL unembedding).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lens_safety.architecture import clean_hf_name
from lens_safety.edits.checkpoint import checkpoint_writers, read_tensors
from lens_safety.edits.spec import EditSpec, edit_writes, require_finite
from lens_safety.edits.targets import target_parameters
from lens_safety.errors import LensSafetyError


def edit_deltas(model: Any, spec: EditSpec) -> dict[str, torch.Tensor]:
    """``edit(W_orig) - W_orig`` (float64, CPU) for every touched parameter, by HF state-dict name."""
    return {name: delta for name, (_, delta) in _originals_and_deltas(model, spec).items()}


def _originals_and_deltas(model: Any, spec: EditSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (W_orig in its stored dtype, edit(W_orig) - W_orig in float64)}``."""
    if int(spec.direction.shape[0]) != model.d_model:
        raise LensSafetyError(
            f"direction has width {spec.direction.shape[0]} but the model's residual width is {model.d_model}",
            "use a direction extracted from this architecture",
        )
    writers = checkpoint_writers(model)
    targets = target_parameters(spec, writers, model.n_layers)
    originals = read_tensors(model.hf_path, targets)
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (writer, is_bias) in targets.items():
        base = originals[name].to(torch.float64)
        edited = edit_writes(spec, base, writer.layout, is_bias)
        require_finite(name, base, edited, originals[name].dtype)
        deltas[name] = (originals[name], edited - base)
    return deltas


def live_parameters(hf_model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of the wrapped HF model under their HF state-dict names (bridge wrappers dropped)."""
    out: dict[str, nn.Parameter] = {}
    for name, param in hf_model.named_parameters(remove_duplicate=False):
        out.setdefault(clean_hf_name(name), param)
    return out


def _untie(hf_model: Any) -> Any:
    """Give ``lm_head`` its own copy of a shared embedding; return a callable that re-ties it."""
    emb, out = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    if out is None or emb is None or out.weight is not emb.weight:
        return lambda: None
    shared = out.weight
    out.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)

    def retie() -> None:
        out.weight = shared

    return retie


def _edited_value(
    original: torch.Tensor, param: torch.Tensor, delta: torch.Tensor, processed: bool
) -> torch.Tensor:
    """The live value of an edited parameter (see the module docstring for the rounding)."""
    live = param.detach().to(torch.float64).cpu()
    if original.dtype == param.dtype:
        return (live + delta).to(param.dtype)
    base = live if processed else original.to(torch.float64)
    return (base + delta).to(original.dtype).to(param.dtype)


@contextmanager
def applied_edit(model: Any, spec: EditSpec) -> Iterator[dict[str, torch.Tensor]]:
    """Apply ``spec`` to ``model.hf_model`` for the duration of the block; yields the deltas.

    Works for forward passes and ``hf_model.generate``; the original tensors are restored on exit.
    """
    pairs = _originals_and_deltas(model, spec)
    deltas = {name: delta for name, (_, delta) in pairs.items()}
    hf_model = model.hf_model
    touches_embedding = any(w.kind == "embed" for w in model.arch.writers if f"{w.hf_name}.weight" in deltas)
    retie = _untie(hf_model) if touches_embedding else (lambda: None)
    params = live_parameters(hf_model)
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                if name not in params:
                    raise LensSafetyError(
                        f"parameter {name} is not in the loaded model",
                        "report this architecture to lens-safety",
                    )
                param = params[name]
                saved[name] = param.detach().clone()
                param.copy_(_edited_value(pairs[name][0], param, delta, model.compatibility_mode))
        yield deltas
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                params[name].copy_(original)
        retie()
