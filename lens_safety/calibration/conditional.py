"""Calibrate conditional ROSI: which blocks to edit (their read direction) and how much to inject.

For every first edited block ``start`` the read direction of blocks ``start .. end - 1`` is
estimated on TRAINING prompts (:func:`~lens_safety.directions.read.find_read_direction`); every
``injection`` is converted to ``alpha = injection / harmful_mean`` (the refusal-direction
projection the edit adds, to first order, to the mean harmful training prompt). All
``(start, injection)`` points are measured on VALIDATION prompts; the chosen point meets every
bound with the least over-refusal, then KL, then fewest edited blocks.

Refusal and over-refusal both rise with the injection, so a coarse grid can step over the window
where refusal has reached the target but over-refusal has not yet risen. ``refine`` rounds of
bisection look into it: in each round, for every start whose grid holds a pair of neighbouring
injections ``lo < hi`` with ``lo`` below the refusal target and ``hi`` reaching it but breaking
an over-refusal or KL bound, the midpoint ``(lo + hi) / 2`` is measured too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

import torch

from lens_safety.activations import sum_activations
from lens_safety.calibration.results import (
    CalibrationBounds,
    CalibrationPoint,
    CalibrationResult,
    SweepOptions,
    sweep_setup,
)
from lens_safety.calibration.structure import structural_calibration
from lens_safety.directions import Direction
from lens_safety.directions.read import ReadDirection, find_read_directions
from lens_safety.edits import conditional_rosi
from lens_safety.edits.spec import EditSpec
from lens_safety.errors import LensSafetyError
from lens_safety.models import ChatModel
from lens_safety.prompts import PromptSet, PromptSource
from lens_safety.vectors import DirectionLike

#: Injections tried by default, in units of the direction's projection (the refusal organism's
#: harmful prompts sit about 140 above its harmless ones at the direction's layer).
DEFAULT_INJECTIONS: tuple[float, ...] = (100.0, 150.0, 200.0, 250.0)
#: Default bounds of :func:`calibrate_conditional`: over-refusal is an absolute ceiling.
CONDITIONAL_BOUNDS = CalibrationBounds(
    target_refusal=0.85, max_over_refusal=0.1, max_kl=0.5, over_refusal_relative=False
)


@dataclass
class ConditionalPoint:
    """One swept edit: the read direction of its first block, its injection and the edit itself."""

    read: ReadDirection
    injection: float
    spec: EditSpec


@dataclass
class ConditionalCalibration:
    """The sweep's result, the read direction of every ``start`` and every point's edit by label."""

    result: CalibrationResult
    reads: dict[int, ReadDirection]
    edits: dict[str, ConditionalPoint]

    def selected(self) -> tuple[ConditionalPoint, str]:
        """The edit to use and the rule that picked it (see :meth:`CalibrationResult.selected`)."""
        point, rule = self.result.selected()
        return self.edits[point.label], rule

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.result.to_dict(),
            "read_directions": {str(k): v.to_dict() for k, v in self.reads.items()},
        }


def projection_gap(
    model: ChatModel,
    direction: Direction,
    harmful: PromptSource,
    harmless: PromptSource,
    *,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> float:
    """``mean_h (s_hat . x) - mean_b (s_hat . x)`` at ``resid_pre`` of the direction's block, last
    prompt token (raw HF basis), measured on ``model``: how far harmful prompts sit above harmless
    ones along the refusal direction.

    Raises when the gap is not positive, or negligible next to the activations (an abliterated
    model has no component along ``s_hat`` left to measure: use :func:`injection_unit`).
    """
    layer = int(direction.layer)
    s_hat = direction.direction.to(torch.float64)
    means, scale = [], 0.0
    for prompts in (harmful, harmless):
        mean = sum_activations(
            model, prompts, layers=[layer], batch_size=batch_size, system_prompt=system_prompt
        ).mean[0, 0]
        means.append(float(mean @ s_hat))
        scale = max(scale, float(mean.norm()))
    gap = means[0] - means[1]
    if not math.isfinite(gap) or gap <= 1e-6 * scale:
        raise LensSafetyError(
            f"harmful prompts do not sit above harmless ones along the refusal direction at block {layer} "
            f"of this model (gap {gap:.3g}; abliterated models have no component along it)",
            "use the direction's own gap (a direction fitted by lens-safety records it) or absolute injections",
        )
    return gap


def injection_unit(
    model: ChatModel, direction: Direction, harmful: PromptSource, harmless: PromptSource
) -> tuple[float, str]:
    """``(gap, source)``: the unit of relative injections.

    A fitted :class:`~lens_safety.directions.Direction` records the class mean projections of the
    model it was fitted on (``metadata["harmful_projection"]`` / ``["harmless_projection"]``, per
    block); their difference at the direction's block is the unit (``source == "direction"``), so a
    parent's direction gives the same unit on its abliterated child. Otherwise the gap is measured on
    ``model`` with :func:`projection_gap` (``source == "model"``).
    """
    h, b = direction.metadata.get("harmful_projection"), direction.metadata.get("harmless_projection")
    layer = int(direction.layer)
    if isinstance(h, list) and isinstance(b, list) and len(h) > layer and len(b) > layer:
        gap = float(h[layer]) - float(b[layer])
        if math.isfinite(gap) and gap > 0:
            return gap, "direction"
    return projection_gap(model, direction, harmful, harmless), "model"


def calibrate_conditional(
    model: ChatModel,
    direction: DirectionLike,
    harmful_train: PromptSource,
    harmless_train: PromptSource,
    harmful_val: PromptSource,
    harmless_val: PromptSource,
    *,
    starts: Sequence[int],
    end: int | None = None,
    injections: Sequence[float] = DEFAULT_INJECTIONS,
    shrinkage: float | None = None,
    template: bool = False,
    read_harmless: Sequence[PromptSource] = (),
    refine: int = 0,
    **options: Unpack[SweepOptions],
) -> ConditionalCalibration:
    """Sweep first edited block x injection for :func:`~lens_safety.edits.conditional_rosi`.

    ``direction`` is the refusal direction written (raw HF basis); ``end`` defaults to
    ``n_layers - 1``; ``shrinkage`` and ``template`` are the read direction's (see
    :func:`~lens_safety.directions.read.find_read_direction`); ``read_harmless`` are further benign
    prompt sets added to ``harmless_train`` for the read directions only (benign look-alikes of
    harmful requests, so that ``g`` learns not to read them as harm);
    ``refine`` is the number of bisection rounds (module docstring); ``options``: the bounds and
    the measurement (:class:`~lens_safety.calibration.results.SweepOptions`), by default
    :data:`CONDITIONAL_BOUNDS` (an ABSOLUTE over-refusal ceiling), 48 new tokens, batches of 16,
    the template's system prompt and the substring judge. Train and validation prompts must differ.
    """
    setup = sweep_setup(options, CONDITIONAL_BOUNDS, max_new_tokens=48)
    values = _injection_grid(injections, refine)
    reads = find_read_directions(
        model,
        harmful_train,
        PromptSet.concat(harmless_train, *read_harmless) if read_harmless else harmless_train,
        direction,
        starts=starts,
        end=end,
        shrinkage=shrinkage,
        template=template,
        batch_size=setup[1]["batch_size"],
    )
    edits: dict[str, ConditionalPoint] = {}

    def add(read: ReadDirection, injection: float) -> tuple[str, EditSpec]:
        label = f"blocks {read.start}..{read.end - 1}, injection {injection:g}"
        edits[label] = ConditionalPoint(
            read, injection, conditional_rosi(direction, read, read.alpha_for(injection))
        )
        return label, edits[label].spec

    grid = [add(read, injection) for read in reads.values() for injection in values]
    rounds = iter(range(refine))

    def bisect(points: Sequence[CalibrationPoint]) -> list[tuple[str, EditSpec]]:
        if next(rounds, None) is None:
            return []
        return [add(reads[start], injection) for start, injection in _midpoints(points, edits)]

    extra = {
        "starts": sorted(reads),
        "end": next(iter(reads.values())).end,
        "injections": values,
        "shrinkage": shrinkage,
        "template": template,
        "read_harmless": [_set_label(x) for x in read_harmless],
    }
    result = structural_calibration(
        "start block and injection",
        "conditional_rosi",
        model,
        grid,
        (harmful_val, harmless_val),
        setup,
        {**extra, "refine": refine},
        more=bisect,
    )
    return ConditionalCalibration(result, reads, edits)


def _injection_grid(injections: Sequence[float], refine: int) -> list[float]:
    """The sorted distinct injections (each > 0); ``refine`` must be a number of rounds >= 0."""
    values = sorted({float(x) for x in injections})
    if not values or values[0] <= 0:
        raise LensSafetyError(f"injections must be > 0, got {list(injections)}", "pass positive injections")
    if refine < 0:
        raise LensSafetyError(f"refine must be >= 0 rounds, got {refine}", "pass e.g. refine=2")
    return values


def _midpoints(
    points: Sequence[CalibrationPoint], edits: dict[str, ConditionalPoint]
) -> list[tuple[int, float]]:
    """``(start, (lo + hi) / 2)`` for every start with neighbours ``lo`` (below the refusal target)
    and ``hi`` (reaching it, but breaking an over-refusal or KL bound)."""
    by_start: dict[int, list[tuple[float, CalibrationPoint]]] = {}
    for point in points:
        edit = edits[point.label]
        by_start.setdefault(edit.read.start, []).append((edit.injection, point))
    out = []
    for start, measured in sorted(by_start.items()):
        measured.sort(key=lambda item: item[0])
        for (lo, low), (hi, high) in itertools.pairwise(measured):
            if not low.meets_target and high.meets_target and not high.passed:
                out.append((start, (lo + hi) / 2))
    return out


def _set_label(source: PromptSource) -> str:
    """How a prompt source is recorded: its spec, its set's name, or its size."""
    if isinstance(source, str | Path):
        return str(source)
    return str(getattr(source, "name", "") or f"list of {len(source)} prompts")
