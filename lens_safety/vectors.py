"""What a function accepts as a direction: a vector in the raw Hugging Face residual basis
(``hidden_states[l]`` = ``blocks.{l}.hook_resid_pre``), given either as a 1-D tensor or as any
object carrying one in ``.direction`` (a :class:`~lens_safety.directions.Direction`, the result of
:func:`~lens_safety.directions.find_direction`). The vector keeps its norm; callers that need
``r_hat`` normalise it themselves.
"""

from __future__ import annotations

from typing import Protocol, TypeAlias, runtime_checkable

import torch
from jaxtyping import Float


@runtime_checkable
class HasDirection(Protocol):
    """Anything that carries its direction vector as ``.direction``."""

    @property
    def direction(self) -> torch.Tensor: ...


DirectionLike: TypeAlias = Float[torch.Tensor, " d_model"] | HasDirection


def direction_vector(direction: DirectionLike) -> Float[torch.Tensor, " d_model"]:
    """The tensor of ``direction`` (itself, or its ``.direction``), unchanged."""
    if isinstance(direction, torch.Tensor):
        return direction
    if isinstance(direction, HasDirection):
        return torch.as_tensor(direction.direction)
    return torch.as_tensor(direction)


def layer_of(direction: DirectionLike) -> int | None:
    """The block ``direction`` was read at: its ``.layer`` when it carries one (a
    :class:`~lens_safety.directions.Direction`), ``None`` for a bare tensor."""
    layer = getattr(direction, "layer", None)
    return None if layer is None else int(layer)
