"""Extraction + selection + held-out check in one call: what the ``directions`` command runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from lens_safety.activations import collect_activations
from lens_safety.directions.direction import Direction
from lens_safety.directions.extraction import Candidates, extract_directions
from lens_safety.errors import LensSafetyError
from lens_safety.probing import projection_accuracy, split_heldout, validate_classes
from lens_safety.prompts import PromptSet
from lens_safety.selection import Selection, SelectionConfig, filter_by_refusal, select_direction


@dataclass
class DirectionReport:
    """A :class:`Direction` with everything that produced it.

    ``heldout_accuracy`` is the held-out accuracy of thresholding ``r_hat . x`` at the midpoint of
    the training class-mean projections, at the selected layer and position.
    """

    direction: Direction
    candidates: Candidates
    selection: Selection | None
    heldout_accuracy: float
    train: tuple[PromptSet, PromptSet]
    heldout: tuple[PromptSet, PromptSet]

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.direction.to_dict(),
            "heldout_accuracy": self.heldout_accuracy,
            "selection": None if self.selection is None else self.selection.to_dict(),
        }


def find_direction(
    model: Any,
    harmful: PromptSet | Sequence[str] | str,
    harmless: PromptSet | Sequence[str] | str,
    *,
    method: str = "mean-diff",
    layer: int | Literal["auto"] = "auto",
    position: int | Literal["auto"] = "auto",
    selection: SelectionConfig | None = None,
    system_prompt: str | None = None,
    heldout_fraction: float = 0.25,
    filter_train: bool = False,
    batch_size: int = 16,
    progress: bool = False,
) -> DirectionReport:
    """Split both classes (train / held-out), extract candidates on train, select on held-out.

    ``layer`` / ``position`` fix the choice; ``"auto"`` lets selection score it (by default every
    layer at position -1; see :class:`~lens_safety.selection.SelectionConfig`). When both are
    fixed no scoring runs. ``filter_train`` applies Arditi's refusal filter to the training split.
    """
    harmful_set, harmless_set = PromptSet.load(harmful), PromptSet.load(harmless)
    validate_classes(harmful_set, harmless_set)
    (train_h, held_h), (train_b, held_b) = (
        split_heldout(harmful_set, heldout_fraction),
        split_heldout(harmless_set, heldout_fraction),
    )
    if filter_train:
        train_h, train_b = filter_by_refusal(
            model, train_h, train_b, batch_size=batch_size, system_prompt=system_prompt
        )
    candidates = extract_directions(
        model,
        train_h,
        train_b,
        method=method,
        system_prompt=system_prompt,
        batch_size=batch_size,
        progress=progress,
    )
    for value, name, allowed in (
        (layer, "layer", candidates.layers),
        (position, "position", candidates.positions),
    ):
        if value != "auto" and value not in allowed:
            raise LensSafetyError(
                f"{name} {value} is not a candidate {name}", f"use one of {list(allowed)} or auto"
            )
    chosen: Selection | None = None
    if layer == "auto" or position == "auto":
        config = selection or SelectionConfig(system_prompt=system_prompt)
        config = replace(
            config,
            layers=[layer] if layer != "auto" else config.layers,
            positions=[position] if position != "auto" else config.positions,
            system_prompt=system_prompt,
        )
        chosen = select_direction(model, candidates, held_h, held_b, config, progress=progress)
        layer, position = chosen.layer, chosen.position
    assert isinstance(layer, int) and isinstance(position, int)
    reads = [
        collect_activations(
            model,
            p,
            layers=[layer],
            positions=(position,),
            batch_size=batch_size,
            system_prompt=system_prompt,
        )
        for p in (train_h, train_b, held_h, held_b)
    ]
    accuracy = projection_accuracy(
        candidates.vector(layer, position), *(r.at(layer, position) for r in reads)
    )
    p = candidates.positions.index(position)
    metadata = {
        "model": model.identity(),
        "hook": candidates.hook,
        "space": candidates.space,
        "candidate_positions": list(candidates.positions),
        "system_prompt": system_prompt,
        "prompts": {
            "harmful": harmful_set.metadata(),
            "harmless": harmless_set.metadata(),
            "train": {"harmful": train_h.metadata(), "harmless": train_b.metadata()},
            "heldout": {"harmful": held_h.metadata(), "harmless": held_b.metadata()},
        },
        "harmful_projection": candidates.harmful_projection[p].tolist(),
        "harmless_projection": candidates.harmless_projection[p].tolist(),
        "effect_size": candidates.effect_size[p].tolist(),
        "heldout_accuracy": accuracy,
        "selection": None
        if chosen is None
        else {k: v for k, v in chosen.to_dict().items() if k != "candidates"},
    }
    direction = Direction(candidates.vectors[p], layer, position, method, metadata)
    return DirectionReport(direction, candidates, chosen, accuracy, (train_h, train_b), (held_h, held_b))
