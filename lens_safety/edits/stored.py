"""Where each residual writer's tensors are in the checkpoint: names, expert slices, orientation.

transformers 5 may hold a parameter differently from how the checkpoint stores it: Mixtral's
``model.layers.{l}.mlp.experts.down_proj`` (``[n_experts, d_model, d_in]`` in memory) is saved as
``n_experts`` tensors ``model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight``, Granite-MoE's
under another name, and ``save_pretrained`` writes the checkpoint's own format back. Edits are
computed on the tensors as stored (each expert's slice is its own writer, so the result is the
same) and written to disk under their stored names; in-memory edits apply the same values to the
live slices.

A writer parameter stored under its live name with its live shape is stored as loaded.
Otherwise its location comes from transformers' own save-time conversion
(``revert_weight_conversion``), run on a small stand-in whose entries are their own positions:
the stand-in of ``[n_experts, a, b]`` is ``[n_experts, 2, 3]``, so each tensor it reverts to
names its expert (the slice it holds) and whether its last two axes were swapped. Every location
is then checked against the checkpoint's names and shapes; nothing is guessed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lens_safety.architecture import ResidualWriter, WriterTensor, clean_hf_name
from lens_safety.architecture.types import TRANSPOSED
from lens_safety.errors import LensSafetyError

_revert: Callable[..., dict[str, torch.Tensor]] | None
try:  # transformers >= 5: the conversions save_pretrained reverts
    from transformers.core_model_loading import revert_weight_conversion as _revert
except ImportError:  # pragma: no cover - older transformers store what they load
    _revert = None

Shape = tuple[int, ...]
RESAVE = "re-save the checkpoint with save_pretrained, or report this architecture to lens-safety"


def live_parameters(hf_model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of the wrapped HF model under their HF state-dict names (bridge wrappers dropped)."""
    out: dict[str, nn.Parameter] = {}
    for name, param in hf_model.named_parameters(remove_duplicate=False):
        out.setdefault(clean_hf_name(name), param)
    return out


def _stand_in(shape: Shape, experts: bool) -> Shape:
    """The small shape standing in for ``shape``: expert axis kept, ``(2, 3)`` / ``(3,)`` matrices."""
    lead = shape[:1] if experts else ()
    return lead + ((2, 3) if len(shape) - len(lead) == 2 else (3,))


def _decode(stand: torch.Tensor, real: Shape, got: torch.Tensor) -> tuple[int | None, bool, Shape] | None:
    """``(index, transposed, stored shape)`` of a reverted tensor ``got`` taken from ``stand``."""
    candidates: list[tuple[int | None, torch.Tensor, Shape]] = [(None, stand, real)]
    if got.ndim == stand.ndim - 1 and got.numel():
        index = int(got.flatten()[0] - stand.flatten()[0]) // math.prod(stand.shape[1:])
        if 0 <= index < stand.shape[0]:
            candidates = [(index, stand[index], real[1:])]
    for slot, source, shape in candidates:
        if got.shape == source.shape and torch.equal(got, source):
            return slot, False, shape
        if source.ndim >= 2 and torch.equal(got, source.transpose(-1, -2)):
            return slot, True, (*shape[:-2], shape[-1], shape[-2])
    return None


def locate(
    hf_model: nn.Module, wanted: Mapping[str, tuple[Shape, bool]], where: Path
) -> dict[str, list[tuple[str, int | None, bool, Shape]]]:
    """Live name -> ``[(stored key, index, transposed, stored shape)]`` through the save-time
    conversion (see the module docstring); ``wanted`` maps live names to ``(shape, has_experts)``."""
    stands: dict[str, torch.Tensor] = {}
    offset = 0
    for name, (shape, experts) in wanted.items():
        small = _stand_in(shape, experts)
        stands[name] = torch.arange(offset, offset + math.prod(small), dtype=torch.float64).view(small)
        offset += math.prod(small)
    if _revert is None:
        reverted = dict(stands)
    else:
        try:
            reverted = _revert(hf_model, dict(stands))
        except Exception as exc:
            name = next(iter(wanted))
            raise LensSafetyError(
                f"cannot map {name} to the checkpoint at {where} ({type(exc).__name__}: {exc})", RESAVE
            ) from None
    bounds = [(name, int(t.flatten()[0]), int(t.flatten()[-1])) for name, t in stands.items()]
    found: dict[str, list[tuple[str, int | None, bool, Shape]]] = {name: [] for name in wanted}
    for key, got in reverted.items():
        first = int(got.flatten()[0]) if got.numel() else -1
        owner = next((n for n, lo, hi in bounds if lo <= first <= hi), None)
        decoded = None if owner is None else _decode(stands[owner], wanted[owner][0], got)
        if owner is None or decoded is None:
            raise LensSafetyError(f"cannot map the checkpoint tensor {key} to the loaded model", RESAVE)
        found[owner].append((key, *decoded))
    return found


def _check(
    writer: ResidualWriter,
    tensors: Iterable[WriterTensor],
    shapes: Mapping[str, Shape],
    where: Path,
    real: Mapping[str, Shape],
) -> None:
    """Every stored tensor of ``writer`` is in the checkpoint with the shape its live slice has."""
    for tensor in tensors:
        if tensor.key not in shapes:
            raise LensSafetyError(
                f"writer {writer.name} ({tensor.key}) is not in the checkpoint at {where}", RESAVE
            )
        expected = real[tensor.live][1:] if tensor.index is not None else real[tensor.live]
        if tensor.transposed:
            expected = (*expected[:-2], expected[-1], expected[-2])
        if tuple(shapes[tensor.key]) != tuple(expected):
            raise LensSafetyError(
                f"writer {writer.name}: {tensor.key} has shape {tuple(shapes[tensor.key])} in the "
                f"checkpoint at {where}, not {tuple(expected)}",
                RESAVE,
            )


def locate_writer_tensors(
    hf_model: nn.Module, writers: Iterable[ResidualWriter], shapes: Mapping[str, Shape], where: Path
) -> tuple[ResidualWriter, ...]:
    """``writers`` with :attr:`ResidualWriter.stored` set from the checkpoint ``shapes`` (name ->
    shape of every stored tensor); raises when a writer tensor cannot be found there."""
    writers = tuple(writers)
    real = {name: tuple(p.shape) for name, p in live_parameters(hf_model).items()}
    as_loaded = {t.live for w in writers for t in w.live_tensors() if shapes.get(t.live) == real.get(t.live)}
    wanted = {  # live name -> (shape, whether its leading axis is the experts')
        t.live: (real[t.live], w.experts is not None and len(real[t.live]) == (2 if t.is_bias else 3))
        for w in writers
        for t in w.live_tensors()
        if t.live not in as_loaded and t.live in real
    }
    found = locate(hf_model, wanted, where) if wanted else {}
    out = []
    for writer in writers:
        tensors = []
        for live in writer.live_tensors():
            if live.live in as_loaded or live.live not in found:
                tensors.append(live)
                continue
            for key, index, transposed, _ in found[live.live]:
                layout = TRANSPOSED[writer.layout] if transposed and not live.is_bias else writer.layout
                tensors.append(WriterTensor(key, live.is_bias, layout, live.live, index, transposed))
        _check(writer, tensors, shapes, where, real)
        out.append(replace(writer, stored=tuple(tensors)))
    return tuple(out)


def stored_value(tensor: WriterTensor, live_value: torch.Tensor) -> torch.Tensor:
    """The stored tensor's view of a live parameter value (its expert slice, its orientation)."""
    value = live_value[tensor.index] if tensor.index is not None else live_value
    return value.transpose(-1, -2) if tensor.transposed else value


def live_groups(tensors: Iterable[WriterTensor]) -> dict[str, list[WriterTensor]]:
    """Writer tensors grouped by the live parameter they are (slices of)."""
    groups: dict[str, list[WriterTensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.live, []).append(tensor)
    return groups


def assemble(
    base: torch.Tensor, parts: Mapping[WriterTensor, torch.Tensor] | Iterable[tuple[WriterTensor, Any]]
) -> torch.Tensor:
    """A copy of the live value ``base`` with stored-basis values written into their slices."""
    out = base.clone()
    items = parts.items() if isinstance(parts, Mapping) else parts
    for tensor, value in items:
        stored_value(tensor, out).copy_(value)
    return out
