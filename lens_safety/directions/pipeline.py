"""Extraction + selection + held-out check in one call: what the ``directions`` command runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from lens_safety.activations import collect_activations
from lens_safety.directions.direction import Direction
from lens_safety.directions.extraction import Candidates, extract_directions
from lens_safety.errors import LensSafetyError, warn
from lens_safety.evaluation.divergence import last_logits
from lens_safety.evaluation.separation import projection_accuracy, validate_classes
from lens_safety.models import ChatModel
from lens_safety.prompts import PromptSet, PromptSource
from lens_safety.selection import (
    Selection,
    SelectionConfig,
    refusal_metric,
    refusal_token_ids,
    select_direction,
)
from lens_safety.splits import split_train_val_test


@dataclass
class DirectionReport:
    """A :class:`Direction` with everything that produced it.

    ``heldout_accuracy`` is the test-split accuracy of thresholding ``r_hat . x`` at the midpoint
    of the training class-mean projections, at the selected layer and position. Candidates are
    extracted on ``train``, selection scores them on ``validation`` and the accuracy is measured on
    ``heldout`` (the test split), so no number reported here was used to choose.
    ``selection_saw_test`` is True only when the sets were too small to keep val and test apart.
    """

    direction: Direction
    candidates: Candidates
    selection: Selection | None
    heldout_accuracy: float
    train: tuple[PromptSet, PromptSet]
    heldout: tuple[PromptSet, PromptSet]
    validation: tuple[PromptSet, PromptSet]
    selection_saw_test: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.direction.to_dict(),
            "heldout_accuracy": self.heldout_accuracy,
            "selection_saw_test": self.selection_saw_test,
            "selection": None if self.selection is None else self.selection.to_dict(),
        }


def find_direction(
    model: ChatModel,
    harmful: PromptSource,
    harmless: PromptSource,
    *,
    method: str = "mean-diff",
    layer: int | Literal["auto"] = "auto",
    position: int | Literal["auto"] = "auto",
    selection: SelectionConfig | None = None,
    system_prompt: str | None = None,
    heldout_fraction: float = 0.4,
    filter_train: bool = False,
    batch_size: int = 16,
    progress: bool = False,
) -> DirectionReport:
    """Split both classes (train / val / test), extract candidates on train, select on val, report
    the selected direction's accuracy on test (:func:`~lens_safety.splits.split_train_val_test`;
    ``heldout_fraction`` is val + test for sets without pair ids).

    ``layer`` / ``position`` fix the choice; ``"auto"`` lets selection score it (by default every
    layer at position -1; see :class:`~lens_safety.selection.SelectionConfig`). When both are
    fixed no scoring runs. ``filter_train`` applies Arditi's refusal filter to the training split.
    """
    harmful_set, harmless_set = PromptSet.load(harmful), PromptSet.load(harmless)
    validate_classes(harmful_set, harmless_set)
    train_h, val_h, held_h = split_train_val_test(harmful_set, heldout_fraction)
    train_b, val_b, held_b = split_train_val_test(harmless_set, heldout_fraction)
    shared_val_test = val_h is held_h or val_b is held_b
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
    _check_fixed(candidates, layer, position)
    chosen: Selection | None = None
    if layer == "auto" or position == "auto":
        if shared_val_test:
            warn(
                "too few prompts to keep validation and test apart: the reported held-out accuracy "
                "was also used for selection; give at least 4 prompts per class"
            )
        config = _selection_config(selection, layer, position, system_prompt)
        chosen = select_direction(model, candidates, val_h, val_b, config, progress=progress)
        layer, position = chosen.layer, chosen.position
    assert isinstance(layer, int) and isinstance(position, int)
    accuracy = _heldout_accuracy(
        model, candidates, layer, position, (held_h, held_b), batch_size, system_prompt
    )
    p = candidates.positions.index(position)
    splits = {
        "harmful": harmful_set.metadata(),
        "harmless": harmless_set.metadata(),
        "train": {"harmful": train_h.metadata(), "harmless": train_b.metadata()},
        "validation": {"harmful": val_h.metadata(), "harmless": val_b.metadata()},
        "heldout": {"harmful": held_h.metadata(), "harmless": held_b.metadata()},
    }
    saw_test = chosen is not None and shared_val_test
    metadata = _metadata(model, candidates, p, system_prompt, splits, accuracy, saw_test, chosen)
    direction = Direction(candidates.vectors[p], layer, position, method, metadata)
    return DirectionReport(
        direction,
        candidates,
        chosen,
        accuracy,
        (train_h, train_b),
        (held_h, held_b),
        (val_h, val_b),
        saw_test,
    )


def _heldout_accuracy(
    model: ChatModel,
    candidates: Candidates,
    layer: int,
    position: int,
    held: tuple[PromptSet, PromptSet],
    batch_size: int,
    system_prompt: str | None,
) -> float:
    """Accuracy on the held-out ``(harmful, harmless)`` prompts of thresholding ``r_hat . x`` at the
    midpoint of the training class-mean projections, at ``(layer, position)``."""
    reads = [
        collect_activations(
            model,
            p,
            layers=[layer],
            positions=(position,),
            batch_size=batch_size,
            system_prompt=system_prompt,
        ).at(layer, position)
        for p in held
    ]
    p, k = candidates.positions.index(position), candidates.layers.index(layer)
    # the training class means are the candidates' own (one row each: its mean is itself)
    train_means = candidates.harmful_mean[p, k, None], candidates.harmless_mean[p, k, None]
    return projection_accuracy(candidates.vector(layer, position), *train_means, *reads)


def _selection_config(
    selection: SelectionConfig | None,
    layer: int | Literal["auto"],
    position: int | Literal["auto"],
    system_prompt: str | None,
) -> SelectionConfig:
    """``selection`` (default: every layer at position -1) narrowed to a fixed ``layer`` or
    ``position``, scoring with the extraction's ``system_prompt``."""
    config = selection or SelectionConfig(system_prompt=system_prompt)
    return replace(
        config,
        layers=[layer] if layer != "auto" else config.layers,
        positions=[position] if position != "auto" else config.positions,
        system_prompt=system_prompt,
    )


def _check_fixed(candidates: Candidates, layer: int | str, position: int | str) -> None:
    """A fixed ``layer`` / ``position`` must be one the candidates were extracted at."""
    for value, name, allowed in (
        (layer, "layer", candidates.layers),
        (position, "position", candidates.positions),
    ):
        if value != "auto" and value not in allowed:
            raise LensSafetyError(
                f"{name} {value} is not a candidate {name}", f"use one of {list(allowed)} or auto"
            )


def _metadata(
    model: ChatModel,
    candidates: Candidates,
    p: int,
    system_prompt: str | None,
    splits: dict[str, Any],
    accuracy: float,
    saw_test: bool,
    chosen: Selection | None,
) -> dict[str, Any]:
    """What a found direction records: the model, the read, the prompt splits, the class-mean
    projections and effect sizes per layer at its position ``p``, and the selection (no rows)."""
    return {
        "model": model.identity(),
        "hook": candidates.hook,
        "space": candidates.space,
        "candidate_positions": list(candidates.positions),
        "system_prompt": system_prompt,
        "prompts": splits,
        "harmful_projection": candidates.harmful_projection[p].tolist(),
        "harmless_projection": candidates.harmless_projection[p].tolist(),
        "effect_size": candidates.effect_size[p].tolist(),
        "heldout_accuracy": accuracy,
        "selection_saw_test": saw_test,
        "selection": None
        if chosen is None
        else {k: v for k, v in chosen.to_dict().items() if k != "candidates"},
    }


def filter_by_refusal(
    model: ChatModel,
    harmful: PromptSet,
    harmless: PromptSet,
    *,
    refusal_tokens: Sequence[str] | None = None,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> tuple[PromptSet, PromptSet]:
    """Arditi's training filter: keep harmful prompts with metric > 0 and harmless with metric < 0."""
    ids = refusal_token_ids(model.tokenizer, refusal_tokens)
    kept = []
    for prompts, keep_refused in ((harmful, True), (harmless, False)):
        metric = torch.cat(
            [refusal_metric(x, ids) for x in last_logits(model, prompts, batch_size, system_prompt)]
        )
        indices = [i for i, v in enumerate(metric.tolist()) if (v > 0) == keep_refused]
        if len(indices) < 2:
            which = (
                "harmful prompts the model refuses" if keep_refused else "harmless prompts the model answers"
            )
            raise LensSafetyError(
                f"only {len(indices)} {which} remain after the refusal filter",
                "drop the filter (this model barely refuses) or add prompts",
            )
        kept.append(prompts.subset(indices, f"{prompts.name}:filtered"))
    return kept[0], kept[1]
