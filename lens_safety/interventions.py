"""Inference-time interventions on the residual stream, as context managers.

Both work during a plain forward pass and during Hugging Face ``generate`` with the KV cache on:
the hooks sit on the bridge's hook points inside the wrapped HF modules, so every new token is
edited as it is produced. Hooks are always removed on exit (``finally``).

Vectors are in the raw HF residual basis (``blocks.{l}.hook_resid_pre`` = HF ``hidden_states[l]``).
On a model split across devices (``load_model(..., device_map=...)``) each hook meets the residual
stream on its own block's device; the vector is moved there (and cast to the activation's dtype).

* :func:`add_direction` — activation addition, ``x^(l) <- x^(l) + c r`` at one layer, all positions;
* :func:`ablate_direction` — directional ablation, ``x <- x - r_hat (r_hat^T x - m_l)`` at every layer
  and every position (after the embedding and after every attention and MLP write), with
  ``m_l = 0`` (plain ablation, equivalent to weight orthogonalisation) or a per-layer reference
  projection (affine ablation: set the projection to e.g. the harmless mean instead of zero).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from lens_safety.errors import LensSafetyError
from lens_safety.models import ChatModel
from lens_safety.vectors import DirectionLike, direction_vector


def _as_vector(model: ChatModel, vector: DirectionLike) -> torch.Tensor:
    tensor = direction_vector(vector)
    if tensor.ndim != 1 or tensor.shape[0] != model.d_model:
        raise LensSafetyError(
            f"direction has shape {tuple(tensor.shape)} but the model's residual width is {model.d_model}",
            "use a direction extracted from this architecture",
        )
    if not torch.isfinite(tensor).all():
        raise LensSafetyError("direction contains NaN or inf", "re-extract the direction")
    return tensor


@contextmanager
def add_direction(
    model: ChatModel, vector: DirectionLike, *, layer: int, coeff: float = 1.0
) -> Iterator[None]:
    """Activation addition: ``resid_pre[layer] += coeff * vector`` at every position (raw HF basis).

    ``vector`` keeps its norm (use the raw difference in means for Arditi's "induce" test).
    """
    if not 0 <= layer < model.n_layers:
        raise LensSafetyError(f"layer {layer} out of range", f"use 0..{model.n_layers - 1}")
    scaled = coeff * _as_vector(model, vector)
    on_device = {str(device): scaled.to(device) for device in model.devices}

    def add(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        vec = on_device.get(str(activation.device), scaled)
        return activation + vec.to(activation.device, activation.dtype)

    with model.bridge.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", add)]):
        yield


def ablation_hook_points(n_layers: int) -> list[str]:
    """Where the residual stream is projected: every block's input, middle and output."""
    names = []
    for layer in range(n_layers):
        names += [
            f"blocks.{layer}.hook_resid_pre",
            f"blocks.{layer}.hook_resid_mid",
            f"blocks.{layer}.hook_resid_post",
        ]
    return names


@contextmanager
def ablate_direction(
    model: ChatModel,
    direction: DirectionLike,
    *,
    reference: float | Mapping[int, float] = 0.0,
) -> Iterator[None]:
    """Directional ablation ``x <- x - r_hat (r_hat^T x - m_l)`` everywhere in the residual stream.

    Args:
        direction: any non-zero vector; it is normalised here (raw HF basis).
        reference: ``m_l``, the projection each position is set to: ``0`` (plain ablation, the
            inference-time twin of weight orthogonalisation) or per-layer values (affine ablation).
    """
    vec = _as_vector(model, direction).to(torch.float32)
    norm = vec.norm()
    if norm == 0:
        raise LensSafetyError("cannot ablate a zero direction", "use a non-zero direction")
    unit = vec / norm
    on_device = {str(device): unit.to(device) for device in model.devices}

    def make(layer: int) -> Any:
        offset = float(reference.get(layer, 0.0)) if isinstance(reference, Mapping) else float(reference)

        def ablate(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            u = on_device.get(str(activation.device), unit).to(activation.device, activation.dtype)
            projection = activation @ u
            return activation - (projection - offset).unsqueeze(-1) * u

        return ablate

    names = ablation_hook_points(model.n_layers)
    fwd_hooks = [(name, make(int(name.split(".")[1]))) for name in names]
    with model.bridge.hooks(fwd_hooks=fwd_hooks):
        yield
