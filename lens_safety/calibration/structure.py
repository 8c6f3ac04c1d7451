"""Calibrate where the edit acts: the direction's layer and the set of edited blocks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Unpack

from lens_safety.calibration.results import (
    CalibrationBounds,
    CalibrationPoint,
    CalibrationResult,
    SweepOptions,
    sweep_setup,
)
from lens_safety.calibration.sweep import failure_reason, fallback_point, least_collateral, measure_sweep
from lens_safety.directions import Direction
from lens_safety.edits import make_spec
from lens_safety.edits.spec import EditSpec
from lens_safety.errors import LensSafetyError
from lens_safety.models import ChatModel
from lens_safety.prompts import PromptSource
from lens_safety.vectors import DirectionLike, layer_of

#: a labelled edit of a sweep
LabelledSpec = tuple[str, EditSpec]


def block_ranges(
    n_layers: int, direction_layer: int | None, window: int = 4
) -> dict[str, tuple[int, ...] | None]:
    """Candidate sets of edited blocks: all, each half, and windows around the direction's layer."""
    ranges: dict[str, tuple[int, ...] | None] = {
        "all": None,
        "first half": tuple(range(n_layers // 2)),
        "last half": tuple(range(n_layers // 2, n_layers)),
    }
    if direction_layer is not None:
        lo = max(0, direction_layer - window)
        ranges[f"window {lo}..{direction_layer - 1}"] = tuple(range(lo, direction_layer)) or None
        ranges[f"from {direction_layer}"] = tuple(range(direction_layer, n_layers))
        ranges[f"up to {direction_layer - 1}"] = tuple(range(direction_layer)) or None
    return {k: v for k, v in ranges.items() if v is None or len(v) > 0}


def structural_calibration(
    parameter: str,
    method: str,
    model: ChatModel,
    specs: list[LabelledSpec],
    val: tuple[PromptSource, PromptSource],
    setup: tuple[CalibrationBounds, dict[str, Any]],
    extra: dict[str, Any],
    more: Callable[[Sequence[CalibrationPoint]], Sequence[LabelledSpec]] | None = None,
) -> CalibrationResult:
    """Measure ``specs`` on the ``(harmful, harmless)`` validation prompts ``val`` with the
    ``(bounds, measurement)`` of :func:`~lens_safety.calibration.results.sweep_setup`, and choose
    among the points meeting every bound the least over-refusal, then KL, then fewest blocks."""
    bounds, measure = setup
    baseline, points, settings = measure_sweep(model, specs, *val, bounds=bounds, more=more, **measure)
    chosen = least_collateral(points)
    reason = (
        f"{chosen.label}: meets every bound with the least over-refusal, then KL, then fewest blocks"
        if chosen is not None
        else failure_reason(points, bounds, parameter, baseline)
    )
    fallback = fallback_point(points)
    settings = {**settings, **extra}
    return CalibrationResult(parameter, method, bounds, baseline, points, chosen, reason, fallback, settings)


def calibrate_layer(
    model: ChatModel,
    direction: Direction,
    harmful_val: PromptSource,
    harmless_val: PromptSource,
    *,
    alpha: float,
    method: str = "rosi",
    candidate_layers: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    targets: Sequence[str] | None = None,
    **options: Unpack[SweepOptions],
) -> CalibrationResult:
    """Try the direction read at each candidate layer (``direction.directions[l]``), same ``alpha``.

    ``direction`` must be a ``Direction`` (it carries one raw candidate per layer). Default
    candidates: every other layer below ``0.8 * n_layers`` plus the direction's own layer.
    ``layers`` / ``targets``: the edited blocks and writers; ``options``: bounds and measurement
    with the defaults of :func:`~lens_safety.calibration.calibrate_alpha`.
    """
    setup = sweep_setup(options, CalibrationBounds(), max_new_tokens=24)
    if not isinstance(direction, Direction):
        raise LensSafetyError(
            "layer calibration needs a Direction with per-layer candidates", "pass a saved/fitted Direction"
        )
    candidates = direction.directions
    n = int(candidates.shape[0])
    default = sorted({*range(0, int(0.8 * n), 2), int(direction.layer)})
    chosen_layers = list(default if candidate_layers is None else candidate_layers)
    bad = [x for x in chosen_layers if not 0 <= x < n]
    if bad or not chosen_layers:
        raise LensSafetyError(f"candidate layers {bad or '[]'} out of range", f"use layers 0..{n - 1}")
    specs = [
        (
            f"layer {l}",
            make_spec(
                method,
                candidates[l],
                alpha=alpha,
                layers=layers,
                targets=targets,
                d_model=model.d_model,
                direction_layer=l,
            ),
        )
        for l in chosen_layers  # noqa: E741
    ]
    extra = {"alpha": alpha, "candidate_layers": chosen_layers}
    return structural_calibration("layer", method, model, specs, (harmful_val, harmless_val), setup, extra)


def calibrate_block_range(
    model: ChatModel,
    direction: DirectionLike,
    harmful_val: PromptSource,
    harmless_val: PromptSource,
    *,
    alpha: float,
    method: str = "rosi",
    ranges: Mapping[str, Sequence[int] | None] | None = None,
    targets: Sequence[str] | None = None,
    **options: Unpack[SweepOptions],
) -> CalibrationResult:
    """Try editing different sets of blocks (default :func:`block_ranges`), same direction and
    alpha; ``options`` as in :func:`calibrate_layer`."""
    setup = sweep_setup(options, CalibrationBounds(), max_new_tokens=24)
    layer = layer_of(direction)
    candidates = block_ranges(model.n_layers, layer) if ranges is None else dict(ranges)
    if not candidates:
        raise LensSafetyError("no block ranges to try", "pass at least one range")
    specs = [
        (
            label,
            make_spec(method, direction, alpha=alpha, layers=blocks, targets=targets, d_model=model.d_model),
        )
        for label, blocks in candidates.items()
    ]
    extra = {"alpha": alpha, "ranges": {k: None if v is None else list(v) for k, v in candidates.items()}}
    return structural_calibration("blocks", method, model, specs, (harmful_val, harmless_val), setup, extra)


#: type of the three calibration functions, for callers that pick one
Calibrator = Callable[..., CalibrationResult]
