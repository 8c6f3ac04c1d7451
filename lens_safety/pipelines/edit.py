"""The edit job: fit or load a refusal direction, calibrate the strength, edit, measure, export.

``method`` is one of the strength-controlled rank-one writer edits or abliteration
(:mod:`lens_safety.edits.spec`), applied to the writers of ``blocks`` (all by default):

* ``rosi`` — ``W' = W + alpha s_hat w_bar^T`` (``w_bar``: mean row of the original weight);
* ``amplify`` — ``W' = (I + alpha s_hat s_hat^T) W``;
* ``orthogonalize`` — ``W' = (I - s_hat s_hat^T) W`` (no strength; embeddings included).

``s_hat`` is the unit refusal direction in the raw Hugging Face residual basis. ``alpha="auto"``
sweeps ``alphas`` on the ``val`` split and takes :meth:`CalibrationResult.choose
<lens_safety.calibration.CalibrationResult.choose>`'s point: the smallest alpha meeting every
bound, else the recorded fallback. The ``test`` split measures refusal before / after (greedy,
substring judge); the numbers go into the model card and ``edit.json`` of the verified export.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Unpack

from lens_safety.calibration import calibrate_alpha
from lens_safety.edits import make_spec
from lens_safety.edits.methods import EDIT_METHODS as REGISTRY
from lens_safety.edits.methods import edit_method
from lens_safety.errors import LensSafetyError
from lens_safety.pipelines.steps import (
    JobOptions,
    Pair,
    Splits,
    calibration_files,
    check_blocks,
    choose_point,
    export_summary,
    load_splits,
    measure_and_export,
    obtain_direction,
    start_job,
    sweep_options,
)

if TYPE_CHECKING:
    from lens_safety.calibration import CalibrationResult
    from lens_safety.calibration.results import Choice
    from lens_safety.directions import Direction
    from lens_safety.edits.spec import EditSpec
    from lens_safety.export import ExportResult
    from lens_safety.models import ChatModel

#: the methods :func:`run_edit` runs (``in_edit_job`` in the registry,
#: :data:`lens_safety.edits.methods.EDIT_METHODS`)
EDIT_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY.values() if m.in_edit_job)


@dataclass(frozen=True)
class EditSettings:
    """How :func:`run_edit` edits (see the module docstring).

    ``direction``: a saved direction directory (``None``: fit one on ``train``); ``layer``: its
    block (``"auto"``: selection); ``alpha``: a fixed strength or ``"auto"`` (calibrate on
    ``val`` over ``alphas``, default :data:`~lens_safety.calibration.DEFAULT_ALPHAS`; ignored by
    ``orthogonalize``); the bounds as in :class:`~lens_safety.calibration.CalibrationBounds`;
    ``blocks`` / ``targets``: the edited blocks / writer kinds (``None``: the method's defaults);
    ``system_prompt`` is used when fitting the direction only; ``n_test=0`` skips before / after.
    """

    method: Literal["rosi", "amplify", "orthogonalize"] = "rosi"
    direction: Path | None = None
    harmful: str = "builtin:harmful"
    harmless: str = "builtin:harmless"
    layer: int | Literal["auto"] = "auto"
    alpha: float | Literal["auto"] = "auto"
    alphas: tuple[float, ...] | None = None
    target_refusal: float = 0.9
    max_over_refusal: float = 0.1
    over_refusal_relative: bool = True
    max_kl: float = 0.1
    blocks: tuple[int, ...] | None = None
    targets: tuple[str, ...] | None = None
    system_prompt: str | None = None
    n_train: int = 64
    n_val: int = 16
    n_test: int = 16
    max_new_tokens: int = 24
    approximate: bool = False

    def __post_init__(self) -> None:
        edit_method(self.method, EDIT_METHODS)
        if self.alpha != "auto" and not math.isfinite(float(self.alpha)):
            raise LensSafetyError(f"alpha must be a finite number, got {self.alpha}", "pass e.g. alpha=30")

    @property
    def calibrates(self) -> bool:
        """Whether alpha is calibrated: ``alpha="auto"`` with a method that has a strength."""
        return edit_method(self.method).has_strength and self.alpha == "auto"


def alpha_choice(choice: Choice | None, method: str) -> str | None:
    """``calibrated`` / ``fallback`` (the calibration's rule), ``fixed``, or ``None`` (no strength)."""
    if choice is not None:
        return "fallback" if choice.fallback else "calibrated"
    return "fixed" if edit_method(method).has_strength else None


def edit_card(
    measurements: dict[str, Any], choice: Choice | None, method: str, system_prompt: str | None
) -> dict[str, Any]:
    """What the model card and ``edit.json`` record besides the edit: before / after, how alpha was set."""
    card: dict[str, Any] = {**measurements, "system_prompt_at_extraction": system_prompt}
    how = alpha_choice(choice, method)
    if how is not None:
        card["alpha_choice"] = how
    if choice is not None:
        card["message"] = choice.message
    return card


@dataclass
class EditRun:
    """What :func:`run_edit` did: the verified export, the direction, the edit and its numbers.

    ``choice``: the calibrated point and its rule (``None`` unless calibrated); ``measurements``:
    before / after refusal on the test split (empty with ``n_test=0``).
    """

    export: ExportResult
    direction: Direction
    spec: EditSpec
    measurements: dict[str, Any]
    choice: Choice | None
    calibration: CalibrationResult | None
    system_prompt_at_extraction: str | None
    seconds: float = 0.0

    @property
    def alpha_choice(self) -> str | None:
        """How alpha was set: ``calibrated`` (a point met every bound), ``fallback`` (none did; see
        :attr:`message`), ``fixed``, or ``None`` (``orthogonalize`` has no strength)."""
        return alpha_choice(self.choice, self.spec.method)

    @property
    def message(self) -> str | None:
        return None if self.choice is None else self.choice.message

    def card(self) -> dict[str, Any]:
        """What the model card and ``edit.json`` record besides the edit itself."""
        return edit_card(self.measurements, self.choice, self.spec.method, self.system_prompt_at_extraction)

    def to_dict(self) -> dict[str, Any]:
        """The flat summary ``lens-safety rosi --json`` prints."""
        extra = {k: v for k, v in self.card().items() if k not in self.measurements}
        if self.calibration is not None:
            extra["calibration"] = [p.to_dict() for p in self.calibration.points]
            extra["calibration_baseline"] = self.calibration.baseline.to_dict()
        extra["seconds"] = self.seconds
        return export_summary(self.export, self.direction, self.measurements, extra)


def choose_alpha(
    model: ChatModel, direction: Direction, val: Pair, settings: EditSettings, *, progress: bool = False
) -> tuple[Choice, CalibrationResult]:
    """The strength calibrated on ``val`` (:meth:`CalibrationResult.choose`; a fallback warns)."""

    result = calibrate_alpha(
        model,
        direction,
        *val,
        method=settings.method,
        alphas=settings.alphas,
        layers=settings.blocks,
        targets=settings.targets,
        **sweep_options(settings, progress),
    )
    return choose_point(result), result


def edit_and_export(
    model: ChatModel,
    direction: Direction,
    splits: Splits,
    settings: EditSettings,
    out: Path,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> EditRun:
    """The edit of ``settings`` with ``direction`` on a loaded ``model``: calibrate on
    ``splits.val`` (``alpha="auto"``), measure on ``splits.test`` (``n_test > 0``), export to ``out``."""

    s = settings
    check_blocks(s.blocks, model.n_layers)
    kwargs: dict[str, Any] = {"layers": s.blocks, "targets": s.targets, "d_model": model.d_model}
    choice, calibration = None, None
    kind = edit_method(s.method)
    if not kind.exact_on_post_norm:  # only there does approximate change anything
        kwargs["approximate"] = s.approximate
    if s.calibrates:
        choice, calibration = choose_alpha(model, direction, splits.pair("val"), s, progress=progress)
        kwargs["alpha"] = choice.point.alpha
    elif kind.has_strength:
        kwargs["alpha"] = float(s.alpha)
    spec = make_spec(s.method, direction, **kwargs)
    measurements, exported = measure_and_export(
        model,
        spec,
        direction,
        out,
        test=splits.pair("test") if s.n_test > 0 else None,
        max_new_tokens=s.max_new_tokens,
        record=edit_card({}, choice, s.method, s.system_prompt),
        files=calibration_files(calibration) if calibration is not None else {},
        overwrite=overwrite,
        progress=progress,
    )
    return EditRun(exported, direction, spec, measurements, choice, calibration, s.system_prompt)


def run_edit(
    model: str | os.PathLike[str] | ChatModel,
    out: str | os.PathLike[str],
    settings: EditSettings | None = None,
    **options: Unpack[JobOptions],
) -> EditRun:
    """Edit ``model`` (a loaded model or a spec, then loaded and self-checked) as ``settings`` say
    and export it to ``out`` as a verified Hugging Face directory (module docstring); ``options``:
    :class:`~lens_safety.pipelines.steps.JobOptions` (``overwrite``, ``device``, ``dtype``,
    ``progress``)."""

    s = settings or EditSettings()
    needs_prompts = s.direction is None or s.calibrates or s.n_test > 0
    job = start_job(
        model,
        out,
        lambda: (
            load_splits(s.harmful, s.harmless, s.n_train, s.n_val, s.n_test) if needs_prompts else Splits()
        ),
        options,
    )
    check_blocks(s.blocks, job.model.n_layers)
    direction, _ = obtain_direction(
        job.model, s.direction, s.layer, job.splits.train, s.system_prompt, progress=job.progress
    )
    run = edit_and_export(
        job.model, direction, job.splits, s, job.out, overwrite=job.overwrite, progress=job.progress
    )
    run.seconds = job.seconds()
    return run
