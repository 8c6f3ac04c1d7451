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

On a model split across devices every parameter is edited where it lives: in place on its own
device, or, when accelerate offloaded it (to disk or CPU: a ``meta`` placeholder), through an overlay
on its offload hook's weights map, so each call of the module materialises the edited value (kept
where the original was: CPU memory, or a temporary file for a weight offloaded to disk;
:func:`lens_safety.placement.write_parameter`; the checkpoint on disk is never written).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lens_safety.architecture import ResidualWriter, WriterTensor
from lens_safety.edits.checkpoint import checkpoint_writers, read_tensors
from lens_safety.edits.spec import EditSpec, edit_writes, require_finite
from lens_safety.edits.stored import assemble, live_parameters, stored_value
from lens_safety.edits.targets import target_parameters
from lens_safety.errors import LensSafetyError
from lens_safety.models import ChatModel
from lens_safety.placement import read_parameter, write_parameter


def edit_deltas(model: ChatModel, spec: EditSpec) -> dict[str, torch.Tensor]:
    """``edit(W_orig) - W_orig`` (float64, CPU) for every touched tensor, by checkpoint name."""
    return {delta.tensor.key: delta.delta for delta in _originals_and_deltas(model, spec)}


@dataclass(frozen=True)
class _Delta:
    """One touched checkpoint tensor: where it lives, its original (stored dtype), its delta (float64)."""

    kind: str
    tensor: WriterTensor
    original: torch.Tensor
    delta: torch.Tensor


#: checkpoint name -> (its writer, the tensor's place in the live model)
Targets = dict[str, tuple[ResidualWriter, WriterTensor]]


def _targets(model: ChatModel, spec: EditSpec) -> Targets:
    """Every checkpoint tensor ``spec`` touches (the direction's width checked first)."""
    if int(spec.direction.shape[0]) != model.d_model:
        raise LensSafetyError(
            f"direction has width {spec.direction.shape[0]} but the model's residual width is {model.d_model}",
            "use a direction extracted from this architecture",
        )
    return target_parameters(spec, checkpoint_writers(model), model.n_layers)


def _deltas_of(model: ChatModel, spec: EditSpec, targets: Targets) -> list[_Delta]:
    """Original and ``edit(W_orig) - W_orig`` of the named checkpoint tensors."""
    originals = read_tensors(model.hf_path, targets)
    deltas = []
    for name, (writer, tensor) in targets.items():
        base = originals[name].to(torch.float64)
        edited = edit_writes(spec, base, tensor.layout, tensor.is_bias)
        require_finite(name, base, edited, originals[name].dtype)
        deltas.append(_Delta(writer.kind, tensor, originals[name], edited - base))
    return deltas


def _originals_and_deltas(model: ChatModel, spec: EditSpec) -> list[_Delta]:
    """Original and ``edit(W_orig) - W_orig`` of every touched checkpoint tensor."""
    return _deltas_of(model, spec, _targets(model, spec))


class _LazyDeltas(Mapping[str, torch.Tensor]):
    """The deltas of an applied edit by checkpoint name, each recomputed from the checkpoint when
    read (holding them all in float64 would cost 8 bytes per edited weight)."""

    def __init__(self, model: ChatModel, spec: EditSpec, targets: Targets) -> None:
        self.model, self.spec, self.targets = model, spec, targets

    def __getitem__(self, name: str) -> torch.Tensor:
        return _deltas_of(self.model, self.spec, {name: self.targets[name]})[0].delta

    def __iter__(self) -> Iterator[str]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)


def write_stored(
    hf_model: nn.Module,
    live: str,
    items: Iterable[tuple[WriterTensor, torch.Tensor]],
    *,
    reversible: bool = True,
) -> Callable[[], None]:
    """Write checkpoint-basis values into their slices of the live parameter ``live`` (an expert's
    slice of a fused tensor, transposed back where the checkpoint's orientation differs); return
    the undo (:func:`lens_safety.placement.write_parameter`)."""
    value = assemble(read_parameter(hf_model, live), list(items))
    return write_parameter(hf_model, live, value, reversible=reversible)


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
def applied_edit(model: ChatModel, spec: EditSpec) -> Iterator[Mapping[str, torch.Tensor]]:
    """Apply ``spec`` to ``model.hf_model`` for the duration of the block; yields the deltas (a
    mapping that recomputes each from the checkpoint when read).

    Works for forward passes and ``hf_model.generate``; the original tensors are restored on exit.
    One live parameter is edited at a time, so beyond the edited weights themselves (and the saved
    originals of the ones edited in place) memory holds one parameter's float64 delta.
    """
    targets = _targets(model, spec)
    hf_model = model.hf_model
    embed = any(writer.kind == "embed" for writer, _ in targets.values())
    retie = _untie(hf_model) if embed else (lambda: None)
    params = live_parameters(hf_model)
    groups: dict[str, Targets] = {}
    for name, (writer, tensor) in targets.items():
        groups.setdefault(tensor.live, {})[name] = (writer, tensor)
    undo: list[Callable[[], None]] = []
    try:
        for name, group in groups.items():
            if name not in params:
                raise LensSafetyError(
                    f"parameter {name} is not in the loaded model",
                    "report this architecture to lens-safety",
                )
            live = read_parameter(hf_model, name)
            processed = model.compatibility_mode
            values = [
                (i.tensor, _edited_value(i.original, stored_value(i.tensor, live), i.delta, processed))
                for i in _deltas_of(model, spec, group)
            ]
            undo.append(write_stored(hf_model, name, values))
        yield _LazyDeltas(model, spec, targets)
    finally:
        for restore in reversed(undo):
            restore()
        retie()
