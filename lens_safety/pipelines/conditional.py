"""The conditional-ROSI job: refusal injected in proportion to a harmfulness read direction.

Conditional ROSI edits every attention/MLP writer of blocks ``start .. end - 1`` to
``W' = (I + alpha s_hat g^T) W`` (:func:`~lens_safety.edits.conditional_rosi`): the refusal
direction ``s_hat`` is written in proportion to what the block writes along ``g``, a read
direction estimated on the TRAIN split that separates harmful from harmless prompts and is
orthogonal to ``s_hat`` and to the harmless mean (so harmless prompts get, on average, nothing).
Both vectors are in the raw Hugging Face residual basis.

Injections are in units of the refusal direction's gap (:func:`~lens_safety.calibration.injection_unit`:
the harmful minus harmless mean projection on ``s_hat`` at the direction's block, as recorded
when the direction was fitted), so ``1`` adds to the mean harmful prompt about as much refusal as
separates the classes. Every ``start`` x ``injection`` is measured on the VAL split, with
``refine`` rounds of bisection (:func:`~lens_safety.calibration.calibrate_conditional`); the
exported point is :meth:`CalibrationResult.choose <lens_safety.calibration.CalibrationResult.choose>`'s.
The TEST split measures before / after.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Unpack

from lens_safety.calibration import calibrate_conditional, injection_unit
from lens_safety.errors import LensSafetyError
from lens_safety.pipelines import steps

if TYPE_CHECKING:
    from lens_safety.calibration import ConditionalCalibration
    from lens_safety.calibration.conditional import ConditionalPoint
    from lens_safety.calibration.results import Choice
    from lens_safety.directions import Direction
    from lens_safety.export import ExportResult
    from lens_safety.models import ChatModel

#: Injections swept by default, in gaps (see the module docstring).
DEFAULT_RELATIVE_INJECTIONS: tuple[float, ...] = (0.75, 1.0, 1.5, 2.0)


#: Fractions of the depth :func:`default_starts` starts the edited blocks at.
START_FRACTIONS: tuple[float, ...] = (1 / 3, 1 / 2, 2 / 3)


def default_starts(n_layers: int, fractions: tuple[float, ...] = START_FRACTIONS) -> list[int]:
    """First edited blocks swept by default: about ``fractions`` of the depth (a third, a half
    and two thirds), each kept within blocks ``1 .. n_layers - 2``."""
    return sorted({min(max(1, round(n_layers * f)), n_layers - 2) for f in fractions})


def resolve_blocks(starts: Sequence[int] | None, end: int | None, n_layers: int) -> tuple[list[int], int]:
    """``(start blocks to sweep, end)`` checked against the model's depth (``starts=None``:
    :func:`default_starts`; ``end=None``: ``n_layers - 1``)."""
    end = n_layers - 1 if end is None else end
    blocks = sorted({int(b) for b in (default_starts(n_layers) if starts is None else starts)})
    if not blocks or not 0 < end <= n_layers or any(b < 0 or b >= end for b in blocks):
        raise LensSafetyError(
            f"edited blocks start {blocks} .. end {end} are not 0 <= start < end <= {n_layers}",
            f"pick start blocks below --end (default {n_layers - 1}) and --end <= {n_layers}",
        )
    return blocks, end


@dataclass(frozen=True)
class ConditionalSettings:
    """How :func:`run_conditional` edits (module docstring).

    ``injections`` are in gaps; ``refine``: bisection rounds after the grid; ``shrinkage``: the
    read direction's shrinkage-LDA ridge (``None``: the plain mean difference); ``template``:
    also orthogonal to the chat template's shared positions; ``read_harmless``: benign prompt
    sets added to the harmless train prompts of the read directions. ``max_over_refusal`` is an
    absolute ceiling unless ``over_refusal_relative``.
    """

    direction: Path | None = None
    harmful: str = "builtin:harmful"
    harmless: str = "builtin:harmless"
    layer: int | Literal["auto"] = "auto"
    starts: tuple[int, ...] | None = None
    end: int | None = None
    injections: tuple[float, ...] = DEFAULT_RELATIVE_INJECTIONS
    refine: int = 2
    shrinkage: float | None = 1.0
    template: bool = False
    read_harmless: tuple[str, ...] = ()
    target_refusal: float = 0.85
    max_over_refusal: float = 0.1
    over_refusal_relative: bool = False
    max_kl: float = 0.5
    n_train: int = 128
    n_val: int = 32
    n_test: int = 16
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        if not self.injections or not all(math.isfinite(k) and k > 0 for k in self.injections):
            raise LensSafetyError(
                f"injections must be positive numbers, got {list(self.injections)}", "pass e.g. 0.75,1,1.5"
            )
        if self.refine < 0:
            raise LensSafetyError(f"refine must be >= 0, got {self.refine}", "pass e.g. refine=2")


def point_record(picked: ConditionalPoint, gap: float, gap_source: str, choice: Choice) -> dict[str, Any]:
    """A conditional-ROSI point as recorded in ``edit.json``: blocks, injection in gaps, read direction."""
    read = picked.read
    return {
        "start": read.start,
        "end": read.end,
        "injection_gaps": picked.injection / gap,
        "gap": gap,
        "gap_source": gap_source,
        "read_separation": read.separation,
        "shrinkage": read.shrinkage,
        "template_positions": read.template_positions,
        "read_prompts": {"harmful": read.n_harmful, "harmless": read.n_harmless},
        "choice": choice.rule,
        "message": choice.message,
    }


@dataclass
class ConditionalRun:
    """What :func:`run_conditional` did: the verified export, the sweep, the exported point."""

    export: ExportResult
    direction: Direction
    sweep: ConditionalCalibration
    picked: ConditionalPoint
    choice: Choice
    gap: float
    gap_source: str
    measurements: dict[str, Any]
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        """The exported point, its read direction and the rule that picked it (``edit.json``)."""
        return point_record(self.picked, self.gap, self.gap_source, self.choice)

    def to_dict(self) -> dict[str, Any]:
        """The flat summary ``lens-safety conditional-rosi --json`` prints."""
        extra = {**self.record(), "seconds": self.seconds}
        return steps.export_summary(self.export, self.direction, self.measurements, extra)


def run_conditional(
    model: str | os.PathLike[str] | ChatModel,
    out: str | os.PathLike[str],
    settings: ConditionalSettings | None = None,
    **options: Unpack[steps.JobOptions],
) -> ConditionalRun:
    """Calibrate conditional ROSI on ``model`` (a loaded model or a spec, then loaded and
    self-checked) and export the chosen edit to ``out`` as a verified Hugging Face directory;
    ``options``: :class:`~lens_safety.pipelines.steps.JobOptions`."""

    s = settings or ConditionalSettings()
    job = steps.start_job(
        model, out, lambda: steps.load_splits(s.harmful, s.harmless, s.n_train, s.n_val, s.n_test), options
    )
    loaded, splits, progress = job.model, job.splits, job.progress
    starts, end = resolve_blocks(s.starts, s.end, loaded.n_layers)
    train = splits.pair("train")
    direction, _ = steps.obtain_direction(loaded, s.direction, s.layer, train, None, progress=progress)
    gap, gap_source = injection_unit(loaded, direction, *train)
    sweep = calibrate_conditional(
        loaded,
        direction,
        *train,
        *splits.pair("val"),
        starts=starts,
        end=end,
        injections=[k * gap for k in s.injections],
        shrinkage=s.shrinkage,
        template=s.template,
        read_harmless=s.read_harmless,
        refine=s.refine,
        **steps.sweep_options(s, progress),
    )
    choice = steps.choose_point(sweep.result)
    picked = sweep.edits[choice.point.label]
    measurements, exported = steps.measure_and_export(
        loaded,
        picked.spec,
        direction,
        job.out,
        test=splits.pair("test") if s.n_test > 0 else None,
        max_new_tokens=s.max_new_tokens,
        record=point_record(picked, gap, gap_source, choice),
        files=steps.calibration_files(sweep.result),
        overwrite=job.overwrite,
        progress=progress,
    )
    return ConditionalRun(
        exported, direction, sweep, picked, choice, gap, gap_source, measurements, job.seconds()
    )
