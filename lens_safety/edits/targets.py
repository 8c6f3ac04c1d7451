"""Which parameters an edit touches, and the pure edit of a state dict (maths: :mod:`.spec`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from lens_safety.architecture import ResidualWriter, WriterTensor
from lens_safety.edits.methods import WRITER_KINDS, edit_method
from lens_safety.edits.spec import EditSpec, edit_writes, require_finite
from lens_safety.errors import LensSafetyError, first_of


def select_writers(
    spec: EditSpec, writers: Iterable[ResidualWriter], n_layers: int | None = None
) -> list[ResidualWriter]:
    """The writers an edit touches: by kind or exact name, restricted to ``spec.layers`` for blocks."""
    writers = list(writers)
    names = {w.name for w in writers}
    for target in spec.targets:
        if target not in WRITER_KINDS and target not in names:
            raise LensSafetyError(
                f"unknown edit target '{target}'",
                f"use writer kinds ({', '.join(WRITER_KINDS)}) or writer names like blocks.0.attn.o",
            )
    if spec.layers is not None and n_layers is not None:
        bad = [x for x in spec.layers if not 0 <= x < n_layers]
        if bad:
            raise LensSafetyError(f"edit layers {bad} out of range", f"use blocks 0..{n_layers - 1}")
    chosen = [
        w
        for w in writers
        if (w.kind in spec.targets or w.name in spec.targets)
        and (w.layer is None or spec.layers is None or w.layer in spec.layers)
    ]
    if not chosen:
        raise LensSafetyError(
            f"edit targets {list(spec.targets)} match no writer of this model", "check --targets and --layers"
        )
    kind = edit_method(spec.method)
    inexact = inexact_writers(spec, chosen)
    if inexact and not spec.approximate:
        post, first = [w for w in inexact if w.post_norm], inexact[0]
        why = (
            f"{first_of([w.name for w in post])} writes through a post-norm"
            if post
            else f"{first.name} is joined by {first.fixed_with}"
        )
        raise LensSafetyError(
            f"{why}, so {kind.inexact_effect}",
            f"use inference-time {kind.exact_twin}, or pass approximate=True to accept an inexact edit",
        )
    return chosen


def inexact_writers(spec: EditSpec, writers: Iterable[ResidualWriter]) -> list[ResidualWriter]:
    """The writers among ``writers`` on which ``spec``'s weight edit is not the residual-stream edit
    its method means: post-norm or fixed-with writers, for a method not
    :attr:`~lens_safety.edits.methods.EditMethod.exact_on_post_norm` (post-norm ones first)."""
    if edit_method(spec.method).exact_on_post_norm:
        return []
    writers = list(writers)
    return [w for w in writers if w.post_norm] + [w for w in writers if w.fixed_with and not w.post_norm]


def writer_parameters(writer: ResidualWriter) -> list[tuple[str, bool]]:
    """Checkpoint names of a writer's tensors, with ``is_bias``."""
    return [(tensor.key, tensor.is_bias) for tensor in writer.tensors]


def target_parameters(
    spec: EditSpec, writers: Iterable[ResidualWriter], n_layers: int | None = None
) -> dict[str, tuple[ResidualWriter, WriterTensor]]:
    """Map every checkpoint tensor an edit touches to its writer and tensor (``add_bias``: biases only).

    Names are the checkpoint's (:attr:`ResidualWriter.tensors`): a fused expert parameter stored
    one expert per tensor is touched as ``n_experts`` tensors.
    """
    chosen = select_writers(spec, writers, n_layers)
    biases_only = edit_method(spec.method).biases_only
    if biases_only:
        missing = [w.name for w in chosen if not w.has_bias]
        if missing:
            raise LensSafetyError(
                f"{missing[0]} has no bias to carry the added vector (Llama-family writers have none)",
                "use inference-time add_direction, or an architecture with output biases such as GPT-2",
            )
    return {
        tensor.key: (w, tensor) for w in chosen for tensor in w.tensors if tensor.is_bias or not biases_only
    }


def compute_edit(
    spec: EditSpec,
    base_state: Mapping[str, torch.Tensor],
    writers: Iterable[ResidualWriter],
    *,
    strict: bool = True,
) -> dict[str, torch.Tensor]:
    """New tensors (in each base tensor's dtype) for the targeted parameters present in ``base_state``.

    Pure: ``base_state`` is read, never modified. ``base_state`` holds ORIGINAL (un-centred) HF
    weights by checkpoint name (:func:`target_parameters`). With ``strict`` every targeted
    parameter must be present (pass ``strict=False`` to edit one shard of a checkpoint at a time).
    """
    targets = target_parameters(spec, writers)
    missing = [name for name in targets if name not in base_state]
    if strict and missing:
        raise LensSafetyError(
            f"parameter {missing[0]} is not in the base weights", "pass the model's full original state"
        )
    edited = {}
    for name, (_, tensor) in targets.items():
        if name in base_state:
            new = edit_writes(spec, base_state[name], tensor.layout, tensor.is_bias)
            require_finite(name, base_state[name], new, base_state[name].dtype)
            edited[name] = new.to(base_state[name].dtype)
    return edited


def edits_embedding(spec: EditSpec, writers: Iterable[ResidualWriter]) -> bool:
    """Whether the edit changes the token embedding (which matters for tied ``lm_head``)."""
    return any(w.kind == "embed" for w in select_writers(spec, writers))
