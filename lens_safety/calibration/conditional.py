"""Calibrate conditional ROSI: which blocks to edit (their read direction) and how much to inject.

For every first edited block ``start`` the read direction of blocks ``start .. end - 1`` is
estimated on TRAINING prompts (:func:`~lens_safety.directions.read.find_read_direction`); every
``injection`` is converted to ``alpha = injection / harmful_mean`` (the refusal-direction
projection the edit adds, to first order, to the mean harmful training prompt). All
``(start, injection)`` points are measured on VALIDATION prompts; the chosen point meets every
bound with the least over-refusal, then KL, then fewest edited blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lens_safety.calibration.results import CalibrationBounds, CalibrationResult
from lens_safety.calibration.structure import structural_calibration
from lens_safety.calibration.sweep import measure_kwargs
from lens_safety.directions.read import ReadDirection, find_read_directions
from lens_safety.edits import conditional_rosi
from lens_safety.edits.spec import EditSpec
from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.judges import Judge

#: Injections tried by default, in units of the direction's projection (the refusal organism's
#: harmful prompts sit about 140 above its harmless ones at the direction's layer).
DEFAULT_INJECTIONS: tuple[float, ...] = (100.0, 150.0, 200.0, 250.0)


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


def calibrate_conditional(
    model: Any,
    direction: Any,
    harmful_train: Any,
    harmless_train: Any,
    harmful_val: Any,
    harmless_val: Any,
    *,
    starts: Sequence[int],
    end: int | None = None,
    injections: Sequence[float] = DEFAULT_INJECTIONS,
    shrinkage: float | None = None,
    target_refusal: float = 0.85,
    max_over_refusal: float = 0.1,
    max_kl: float = 0.5,
    over_refusal_relative: bool = False,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    system_prompt: str | None = None,
    judge: Judge | str | None = None,
    progress: bool = False,
) -> ConditionalCalibration:
    """Sweep first edited block x injection for :func:`~lens_safety.edits.conditional_rosi`.

    ``direction`` is the refusal direction written (raw HF basis); ``end`` defaults to
    ``n_layers - 1`` and ``shrinkage`` is the read direction's (see :func:`find_read_direction`).
    Train and validation prompts must differ.
    """
    values = sorted({float(x) for x in injections})
    if not values or values[0] <= 0:
        raise LensSafetyError(f"injections must be > 0, got {list(injections)}", "pass positive injections")
    reads = find_read_directions(
        model,
        harmful_train,
        harmless_train,
        direction,
        starts=starts,
        end=end,
        shrinkage=shrinkage,
        batch_size=batch_size,
    )
    edits = {
        f"blocks {read.start}..{read.end - 1}, injection {injection:g}": ConditionalPoint(
            read, injection, conditional_rosi(direction, read, read.alpha_for(injection))
        )
        for read in reads.values()
        for injection in values
    }
    bounds = CalibrationBounds(target_refusal, max_over_refusal, max_kl, over_refusal_relative)
    measure = measure_kwargs(judge, max_new_tokens, batch_size, system_prompt, progress)
    extra = {
        "starts": sorted(reads),
        "end": next(iter(reads.values())).end,
        "injections": values,
        "shrinkage": shrinkage,
    }
    result = structural_calibration(
        "start block and injection",
        model,
        [(label, edit.spec) for label, edit in edits.items()],
        harmful_val,
        harmless_val,
        bounds,
        "conditional_rosi",
        measure,
        extra,
    )
    return ConditionalCalibration(result, reads, edits)
