"""Building blocks shared by the edit jobs: prompt splits, the direction, before / after, files.

Prompt splits are the deterministic, pair-aligned ``train`` / ``val`` / ``test`` splits of
:meth:`lens_safety.prompts.PromptSet.split` (by topic pair), each capped at its first ``n``
prompts: ``train`` fits a direction, ``val`` calibrates, ``test`` measures before / after.
Every vector is in the raw Hugging Face residual basis.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict

from lens_safety.calibration.results import SweepOptions
from lens_safety.directions import Direction, find_direction
from lens_safety.edits import applied_edit
from lens_safety.errors import LensSafetyError, warn
from lens_safety.evaluation import refusal_rate
from lens_safety.export import check_output_dir, export_edit
from lens_safety.fsutil import require_free
from lens_safety.models import ChatModel, load_model
from lens_safety.probing import validate_classes
from lens_safety.prompts import PromptSet
from lens_safety.selection import SelectionConfig
from lens_safety.selfcheck import require_sound_generation
from lens_safety.splits import capped_splits
from lens_safety.viz.calibration import calibration_figure

if TYPE_CHECKING:
    from lens_safety.calibration import CalibrationResult
    from lens_safety.calibration.results import Choice
    from lens_safety.directions.pipeline import DirectionReport
    from lens_safety.edits.spec import EditSpec
    from lens_safety.export import ExportResult

#: refuse an existing output unless ``overwrite`` (:func:`~lens_safety.fsutil.require_free`)
check_out = require_free
#: a ``(harmful, harmless)`` pair of prompt sets
Pair = tuple["PromptSet", "PromptSet"]
#: what the before / after measurement calls a refusal
TEST_JUDGE = "substring"


@dataclass(frozen=True)
class Splits:
    """``(harmful, harmless)`` prompts of each split; an unused split is an empty pair."""

    train: Pair | tuple[()] = ()
    val: Pair | tuple[()] = ()
    test: Pair | tuple[()] = ()

    def pair(self, split: str) -> Pair:
        """The ``(harmful, harmless)`` pair of ``split``; raises when that split was not loaded."""
        value = getattr(self, split)
        if not value:
            raise LensSafetyError(f"the {split} split was not loaded", "load the splits with prompts")
        return value  # type: ignore[no-any-return]


class JobOptions(TypedDict, total=False):
    """Keyword options of every edit job: ``overwrite`` an existing output (default ``False``),
    ``device`` / ``dtype`` for loading a model spec (default: the loader's), ``progress`` bars
    (default ``False``)."""

    overwrite: bool
    device: str | None
    dtype: str | None
    progress: bool


@dataclass
class JobStart:
    """A started edit job: its loaded model, output path, prompt splits and options."""

    model: ChatModel
    out: Path
    splits: Splits
    overwrite: bool
    progress: bool
    started: float

    def seconds(self) -> float:
        """Wall seconds since the job started."""
        return time.perf_counter() - self.started


def start_job(
    model: str | os.PathLike[str] | ChatModel,
    out: str | os.PathLike[str],
    splits: Callable[[], Splits],
    options: JobOptions,
) -> JobStart:
    """The prologue of an edit job: refuse an existing ``out`` (unless ``overwrite``), load the
    prompt splits, load and self-check the model (:func:`load_chat_model`), refuse an ``out``
    overlapping the model's directory. Nothing is loaded before the cheap checks pass."""

    started = time.perf_counter()
    unknown = sorted(set(options) - JobOptions.__optional_keys__)
    if unknown:
        raise TypeError(
            f"unexpected job option '{unknown[0]}' (known: {sorted(JobOptions.__optional_keys__)})"
        )
    path, overwrite = Path(out), options.get("overwrite", False)
    require_free(path, overwrite)
    loaded_splits = splits()
    loaded = load_chat_model(model, options.get("device"), options.get("dtype"))
    check_output_dir(loaded.hf_path, path, overwrite)
    return JobStart(loaded, path, loaded_splits, overwrite, options.get("progress", False), started)


class Bounded(Protocol):
    """Job settings carrying the calibration bounds and the generation length."""

    @property
    def target_refusal(self) -> float: ...
    @property
    def max_over_refusal(self) -> float: ...
    @property
    def max_kl(self) -> float: ...
    @property
    def over_refusal_relative(self) -> bool: ...
    @property
    def max_new_tokens(self) -> int: ...


def sweep_options(settings: Bounded, progress: bool) -> SweepOptions:
    """The calibration options (:class:`~lens_safety.calibration.results.SweepOptions`) of a job's settings."""
    return SweepOptions(
        target_refusal=settings.target_refusal,
        max_over_refusal=settings.max_over_refusal,
        max_kl=settings.max_kl,
        over_refusal_relative=settings.over_refusal_relative,
        max_new_tokens=settings.max_new_tokens,
        progress=progress,
    )


def load_splits(harmful: str, harmless: str, n_train: int, n_val: int, n_test: int) -> Splits:
    """The first ``n_train`` / ``n_val`` / ``n_test`` prompts per class of each split
    (:func:`~lens_safety.splits.capped_splits`; ``n_test`` may be 0: no test split)."""

    sets = PromptSet.load(harmful), PromptSet.load(harmless)
    validate_classes(*sets)
    return Splits(**capped_splits(*sets, n_train, n_val, n_test))


def load_chat_model(
    model: str | os.PathLike[str] | ChatModel, device: str | None = None, dtype: str | None = None
) -> ChatModel:
    """``model`` itself when already loaded, else :func:`~lens_safety.models.load_model` of the spec
    followed by the greedy-generation self-check (:func:`~lens_safety.selfcheck.require_sound_generation`)."""

    if isinstance(model, ChatModel):
        return model
    loaded = load_model(model, device=device, dtype=dtype)
    require_sound_generation(loaded)
    return loaded


def check_blocks(blocks: tuple[int, ...] | None, n_layers: int) -> None:
    """Edited blocks must be blocks of the model (``None``: all of them)."""
    bad = [b for b in blocks or () if not 0 <= b < n_layers]
    if bad or blocks == ():
        raise LensSafetyError(
            f"edited blocks {bad or '[]'} are outside the model's blocks 0..{n_layers - 1}",
            f"use blocks 0..{n_layers - 1} (--blocks)",
        )


def obtain_direction(
    model: ChatModel,
    direction_dir: Path | None,
    layer: int | Literal["auto"],
    train: Pair | tuple[()],
    system_prompt: str | None = None,
    *,
    stride: int = 1,
    progress: bool = False,
) -> tuple[Direction, DirectionReport | None]:
    """``(direction, report)``: the saved direction at ``direction_dir`` (its candidate at block
    ``layer`` when a number is given; no report), or the difference-in-means direction fitted on
    ``train`` at the last prompt token (``layer="auto"``: selected on a held-out part of it, every
    ``stride``-th layer then the chosen one's neighbours, :class:`~lens_safety.selection.SelectionConfig`)."""

    if direction_dir is not None:
        direction = Direction.load(direction_dir, model=model)
        if isinstance(layer, int):
            if not 0 <= layer < direction.n_layers:
                raise LensSafetyError(f"--layer {layer} is out of range", f"use 0..{direction.n_layers - 1}")
            direction = replace(direction, layer=layer)
        return direction, None
    if isinstance(layer, int) and not 0 <= layer < model.n_layers:
        raise LensSafetyError(f"--layer {layer} is out of range", f"use 0..{model.n_layers - 1} or auto")
    if not train:
        raise LensSafetyError("no training prompts to fit a direction on", "pass --direction or prompts")
    report = find_direction(
        model,
        train[0],
        train[1],
        layer=layer,
        position=-1,
        selection=SelectionConfig(system_prompt=system_prompt, stride=stride),
        system_prompt=system_prompt,
        progress=progress,
    )
    if report.selection is not None and report.selection.fallback:
        warn(report.selection.message)
    return report.direction, report


def refusal_rates(
    model: ChatModel, test: Pair, max_new_tokens: int, *, progress: bool = False
) -> tuple[float, float]:
    """``(harmful, harmless)`` refusal rates of greedy completions (substring judge)."""

    harmful, harmless = (
        refusal_rate(model, p, max_new_tokens=max_new_tokens, progress=progress).rate for p in test
    )
    return harmful, harmless


def before_after(
    model: ChatModel, spec: EditSpec, test: Pair, max_new_tokens: int, *, progress: bool = False
) -> dict[str, Any]:
    """Refusal on ``test`` (greedy, substring judge), unedited then with ``spec`` applied in memory."""

    before = refusal_rates(model, test, max_new_tokens, progress=progress)
    with applied_edit(model, spec):
        after = refusal_rates(model, test, max_new_tokens, progress=progress)
    return {
        "harmful_refusal": {"before": before[0], "after": after[0]},
        "harmless_refusal": {"before": before[1], "after": after[1]},
        "n_test": [len(test[0]), len(test[1])],
        "judge": TEST_JUDGE,
        "question": "refusal",
        "prompts": {"harmful": test[0].name, "harmless": test[1].name},
        "max_new_tokens": max_new_tokens,
    }


def measure_and_export(
    model: ChatModel,
    spec: EditSpec,
    direction: Direction,
    out: Path,
    *,
    test: Pair | None,
    max_new_tokens: int,
    record: dict[str, Any],
    files: dict[str, str],
    overwrite: bool,
    progress: bool,
) -> tuple[dict[str, Any], ExportResult]:
    """``(measurements, export)``: :func:`before_after` on ``test`` (``None``: not measured, ``{}``),
    then the verified export of ``spec`` to ``out`` with ``{**measurements, **record}`` in its
    ``edit.json`` and model card and ``files`` next to it."""

    measurements = (
        before_after(model, spec, test, max_new_tokens, progress=progress) if test is not None else {}
    )
    exported = export_edit(
        model,
        spec,
        out,
        direction=direction,
        overwrite=overwrite,
        measurements={**measurements, **record},
        extra_files=files,
        progress=progress,
    )
    return measurements, exported


def choose_point(result: CalibrationResult) -> Choice:
    """:meth:`CalibrationResult.choose`, with a fallback choice shown as a warning."""
    choice = result.choose()
    if choice.fallback:
        warn(choice.message)
    return choice


def calibration_files(result: CalibrationResult) -> dict[str, str]:
    """``calibration.json`` (the whole sweep) and ``calibration.html`` (its curve) for an export."""

    figure = calibration_figure(result)
    return {
        "calibration.json": json.dumps(result.to_dict(), indent=2),
        "calibration.html": figure.to_html(include_plotlyjs="cdn", full_html=True),
    }


#: what an edit job's summary carries of its before / after measurement: the rates, and which
#: judge, question and prompt sets (with their sizes) produced them
MEASURED = ("harmful_refusal", "harmless_refusal", "judge", "question", "prompts", "n_test")


def export_summary(
    exported: ExportResult, direction: Direction, measurements: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    """The flat summary of an edit job: what was exported, how well it verified, the before /
    after refusal rates and the job's own ``extra`` record."""
    return {
        "out": exported.out_dir,
        "method": exported.edit["method"],
        "alpha": exported.edit["alpha"],
        "layer": direction.layer,
        "position": direction.position,
        "targets": exported.edit["targets"],
        "blocks": exported.edit["layers"],
        "edited_parameters": len(exported.edit["edited_parameters"]),
        "max_abs_logit_diff": exported.max_abs_logit_diff,
        "export_seconds": exported.seconds,
        **{k: v for k, v in measurements.items() if k in MEASURED},
        **extra,
    }
