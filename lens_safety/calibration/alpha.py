"""Calibrate the edit strength: the smallest alpha meeting every bound."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Unpack

from lens_safety.calibration.results import (
    DEFAULT_ALPHAS,
    CalibrationBounds,
    CalibrationResult,
    SweepOptions,
    sweep_setup,
)
from lens_safety.calibration.sweep import failure_reason, fallback_point, measure_sweep
from lens_safety.edits import make_spec
from lens_safety.errors import LensSafetyError
from lens_safety.models import ChatModel
from lens_safety.vectors import DirectionLike


def check_alphas(method: str, alphas: Sequence[float]) -> tuple[float, ...]:
    values = sorted({float(a) for a in alphas})
    if not values:
        raise LensSafetyError("no alphas to sweep", "pass at least one alpha")
    for a in values:
        if not math.isfinite(a):
            raise LensSafetyError(f"alpha must be a finite number, got {a}", "pass finite alphas")
        if method == "rosi" and a <= 0:
            raise LensSafetyError(
                f"ROSI alphas must be > 0, got {a} (0 is the baseline, measured anyway; < 0 removes safety)",
                "pass positive alphas",
            )
    return tuple(values)


def calibrate_alpha(
    model: ChatModel,
    direction: DirectionLike,
    harmful_val: Any,
    harmless_val: Any,
    *,
    method: str = "rosi",
    alphas: Sequence[float] | None = None,
    layers: Sequence[int] | None = None,
    targets: Sequence[str] | None = None,
    **options: Unpack[SweepOptions],
) -> CalibrationResult:
    """Sweep the edit strength on validation prompts; choose the SMALLEST alpha meeting every bound.

    Args:
        model: a loaded raw (non-compatibility) :class:`~lens_safety.models.ChatModel`.
        direction: a ``Direction`` (its unit ``.direction`` and ``.layer``) or a ``[d_model]`` tensor,
            raw HF residual basis, sign toward refusal.
        harmful_val, harmless_val: validation prompts (any :meth:`PromptSet.load` source).
        method: ``rosi`` (``W + alpha s w_bar^T``) or ``amplify`` (``(I + alpha s s^T) W``).
        alphas: strengths to try (default :data:`DEFAULT_ALPHAS`; swept in increasing order).
        layers: blocks whose writers are edited (``None``: all); targets: writer kinds or names.
        options: the bounds and the measurement (:class:`SweepOptions`); defaults
            ``target_refusal=0.9``, ``max_over_refusal=0.1`` (the accepted RISE over the unedited
            model, ``over_refusal_relative=True``), ``max_kl=0.1``, ``max_new_tokens=24``,
            ``batch_size=16``, the template's system prompt, the substring judge, no progress bar.
    """
    bounds, measure = sweep_setup(options, CalibrationBounds(), max_new_tokens=24)
    if method not in DEFAULT_ALPHAS:
        raise LensSafetyError(
            f"alpha calibration needs a strength-controlled method, got '{method}'", "use rosi or amplify"
        )
    grid = check_alphas(method, DEFAULT_ALPHAS[method] if alphas is None else alphas)
    specs = [
        (
            f"alpha={a:g}",
            make_spec(method, direction, alpha=a, layers=layers, targets=targets, d_model=model.d_model),
        )
        for a in grid
    ]
    baseline, points, settings = measure_sweep(
        model, specs, harmful_val, harmless_val, bounds=bounds, **measure
    )
    chosen = next((p for p in points if p.passed), None)  # points are in increasing alpha
    if chosen is not None:
        reason = f"smallest alpha meeting every bound: {chosen.alpha:g}"
        if baseline.meets_target:
            reason += " (the unedited model already reaches the target refusal)"
    else:
        reason = failure_reason(points, bounds, "alpha", baseline)
    settings = {
        **settings,
        "alphas": list(grid),
        "blocks": None if layers is None else list(layers),
        "targets": list(specs[0][1].targets),
    }
    return CalibrationResult(
        "alpha", method, bounds, baseline, points, chosen, reason, fallback_point(points), settings
    )
