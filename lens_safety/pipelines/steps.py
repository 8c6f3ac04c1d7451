"""Building blocks shared by the edit jobs: prompt splits, the direction, before / after, files.

Prompt splits are the deterministic, pair-aligned ``train`` / ``val`` / ``test`` splits of
:meth:`lens_safety.prompts.PromptSet.split` (by topic pair), each capped at its first ``n``
prompts: ``train`` fits a direction, ``val`` calibrates, ``test`` measures before / after.
Every vector is in the raw Hugging Face residual basis.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lens_safety.directions import Direction, find_direction
from lens_safety.edits import applied_edit
from lens_safety.errors import LensSafetyError, warn
from lens_safety.evaluation import refusal_rate
from lens_safety.models import ChatModel, load_model
from lens_safety.probing import validate_classes
from lens_safety.prompts import PromptSet
from lens_safety.selection import SelectionConfig
from lens_safety.selfcheck import require_sound_generation
from lens_safety.viz.calibration import calibration_figure

if TYPE_CHECKING:
    from lens_safety.calibration import CalibrationResult
    from lens_safety.calibration.results import Choice
    from lens_safety.directions import Direction
    from lens_safety.directions.pipeline import DirectionReport
    from lens_safety.edits.spec import EditSpec
    from lens_safety.export import ExportResult
    from lens_safety.models import ChatModel
    from lens_safety.prompts import PromptSet

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


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing output directory unless ``overwrite`` (checked before any model work)."""
    if out.exists() and not overwrite:
        raise LensSafetyError(
            f"output directory {out} already exists", "pass --overwrite or choose another --out"
        )


def load_splits(harmful: str, harmless: str, n_train: int, n_val: int, n_test: int) -> Splits:
    """The first ``n_train`` / ``n_val`` / ``n_test`` prompts per class of each split (``n_test``
    may be 0: no test split)."""

    for value, name in ((n_train, "n-train"), (n_val, "n-val"), (n_test, "n-test")):
        if value < 0 or (value == 0 and name != "n-test"):
            raise LensSafetyError(f"--{name} must be positive, got {value}", f"pass e.g. --{name} 16")
    sets = PromptSet.load(harmful), PromptSet.load(harmless)
    validate_classes(*sets)
    out: dict[str, Any] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        parts = (sets[0].split(split).head(n), sets[1].split(split).head(n))
        if n and min(len(p) for p in parts) == 0:
            raise LensSafetyError(
                f"the {split} split of the prompts is empty (too few prompts)",
                "give more prompts (a few dozen per class) or pass --direction and --alpha",
            )
        out[split] = parts
    return Splits(**out)


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
        **{k: v for k, v in measurements.items() if k in ("harmful_refusal", "harmless_refusal")},
        **extra,
    }
