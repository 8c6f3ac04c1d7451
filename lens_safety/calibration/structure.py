"""Calibrate where the edit acts: the direction's layer and the set of edited blocks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lens_safety.calibration.results import CalibrationBounds, CalibrationPoint, CalibrationResult
from lens_safety.calibration.sweep import (
    failure_reason,
    fallback_point,
    least_collateral,
    measure_kwargs,
    measure_sweep,
)
from lens_safety.edits import make_spec
from lens_safety.edits.spec import EditSpec
from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.judges import Judge


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
    model: Any,
    specs: list[tuple[str, EditSpec]],
    harmful_val: Any,
    harmless_val: Any,
    bounds: CalibrationBounds,
    method: str,
    measure: dict[str, Any],
    extra: dict[str, Any],
    more: Callable[[Sequence[CalibrationPoint]], Sequence[tuple[str, EditSpec]]] | None = None,
) -> CalibrationResult:
    baseline, points, settings = measure_sweep(
        model, specs, harmful_val, harmless_val, bounds=bounds, more=more, **measure
    )
    chosen = least_collateral(points)
    reason = (
        f"{chosen.label}: meets every bound with the least over-refusal, then KL, then fewest blocks"
        if chosen is not None
        else failure_reason(points, bounds, parameter, baseline)
    )
    return CalibrationResult(
        parameter,
        method,
        bounds,
        baseline,
        points,
        chosen,
        reason,
        fallback_point(points),
        {**settings, **extra},
    )


def calibrate_layer(
    model: Any,
    direction: Any,
    harmful_val: Any,
    harmless_val: Any,
    *,
    alpha: float,
    method: str = "rosi",
    candidate_layers: Sequence[int] | None = None,
    target_refusal: float = 0.9,
    max_over_refusal: float = 0.1,
    max_kl: float = 0.1,
    over_refusal_relative: bool = True,
    layers: Sequence[int] | None = None,
    targets: Sequence[str] | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    system_prompt: str | None = None,
    judge: Judge | str | None = None,
    progress: bool = False,
) -> CalibrationResult:
    """Try the direction read at each candidate layer (``direction.directions[l]``), same ``alpha``.

    ``direction`` must be a ``Direction`` (it carries one raw candidate per layer). Default
    candidates: every other layer below ``0.8 * n_layers`` plus the direction's own layer.
    """
    candidates = getattr(direction, "directions", None)
    if candidates is None or getattr(candidates, "ndim", 0) != 2:
        raise LensSafetyError(
            "layer calibration needs a Direction with per-layer candidates", "pass a saved/fitted Direction"
        )
    n = int(candidates.shape[0])
    default = sorted({*range(0, int(0.8 * n), 2), int(direction.layer)})
    chosen_layers = list(default if candidate_layers is None else candidate_layers)
    bad = [x for x in chosen_layers if not 0 <= x < n]
    if bad or not chosen_layers:
        raise LensSafetyError(f"candidate layers {bad or '[]'} out of range", f"use layers 0..{n - 1}")
    bounds = CalibrationBounds(target_refusal, max_over_refusal, max_kl, over_refusal_relative)
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
    measure = measure_kwargs(judge, max_new_tokens, batch_size, system_prompt, progress)
    extra = {"alpha": alpha, "candidate_layers": chosen_layers}
    return structural_calibration(
        "layer", model, specs, harmful_val, harmless_val, bounds, method, measure, extra
    )


def calibrate_block_range(
    model: Any,
    direction: Any,
    harmful_val: Any,
    harmless_val: Any,
    *,
    alpha: float,
    method: str = "rosi",
    ranges: Mapping[str, Sequence[int] | None] | None = None,
    target_refusal: float = 0.9,
    max_over_refusal: float = 0.1,
    max_kl: float = 0.1,
    over_refusal_relative: bool = True,
    targets: Sequence[str] | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    system_prompt: str | None = None,
    judge: Judge | str | None = None,
    progress: bool = False,
) -> CalibrationResult:
    """Try editing different sets of blocks (default :func:`block_ranges`), same direction and alpha."""
    layer = getattr(direction, "layer", None)
    candidates = block_ranges(model.n_layers, layer) if ranges is None else dict(ranges)
    if not candidates:
        raise LensSafetyError("no block ranges to try", "pass at least one range")
    bounds = CalibrationBounds(target_refusal, max_over_refusal, max_kl, over_refusal_relative)
    specs = [
        (
            label,
            make_spec(method, direction, alpha=alpha, layers=blocks, targets=targets, d_model=model.d_model),
        )
        for label, blocks in candidates.items()
    ]
    measure = measure_kwargs(judge, max_new_tokens, batch_size, system_prompt, progress)
    extra = {"alpha": alpha, "ranges": {k: None if v is None else list(v) for k, v in candidates.items()}}
    return structural_calibration(
        "blocks", model, specs, harmful_val, harmless_val, bounds, method, measure, extra
    )


#: type of the three calibration functions, for callers that pick one
Calibrator = Callable[..., CalibrationResult]
