"""Calibrate the edit strength: the smallest alpha meeting every bound."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lens_safety.calibration.results import DEFAULT_ALPHAS, CalibrationBounds, CalibrationResult
from lens_safety.calibration.sweep import failure_reason, fallback_point, measure_sweep
from lens_safety.edits import make_spec
from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.judges import Judge


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
    model: Any,
    direction: Any,
    harmful_val: Any,
    harmless_val: Any,
    *,
    method: str = "rosi",
    alphas: Sequence[float] | None = None,
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
    """Sweep the edit strength on validation prompts; choose the SMALLEST alpha meeting every bound.

    Args:
        model: a loaded raw (non-compatibility) :class:`~lens_safety.models.ChatModel`.
        direction: a ``Direction`` (its unit ``.direction`` and ``.layer``) or a ``[d_model]`` tensor,
            raw HF residual basis, sign toward refusal.
        harmful_val, harmless_val: validation prompts (any :meth:`PromptSet.load` source).
        method: ``rosi`` (``W + alpha s w_bar^T``) or ``amplify`` (``(I + alpha s s^T) W``).
        alphas: strengths to try (default :data:`DEFAULT_ALPHAS`; swept in increasing order).
        target_refusal, max_over_refusal, max_kl, over_refusal_relative: the bounds
            (:class:`CalibrationBounds`; by default ``max_over_refusal`` is the accepted RISE over
            the unedited model).
        layers: blocks whose writers are edited (``None``: all); targets: writer kinds or names.
        max_new_tokens, batch_size, system_prompt, judge: how refusal is measured.
        progress: progress bar over the points.
    """
    if method not in DEFAULT_ALPHAS:
        raise LensSafetyError(
            f"alpha calibration needs a strength-controlled method, got '{method}'", "use rosi or amplify"
        )
    bounds = CalibrationBounds(target_refusal, max_over_refusal, max_kl, over_refusal_relative)
    grid = check_alphas(method, DEFAULT_ALPHAS[method] if alphas is None else alphas)
    specs = [
        (
            f"alpha={a:g}",
            make_spec(method, direction, alpha=a, layers=layers, targets=targets, d_model=model.d_model),
        )
        for a in grid
    ]
    baseline, points, settings = measure_sweep(
        model,
        specs,
        harmful_val,
        harmless_val,
        bounds=bounds,
        judge=judge,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        system_prompt=system_prompt,
        progress=progress,
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
