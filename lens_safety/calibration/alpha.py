"""Calibrate the edit strength: the smallest alpha meeting every bound."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Unpack

from lens_safety.calibration.results import (
    DEFAULT_ALPHAS,
    CalibrationBounds,
    CalibrationResult,
    SweepOptions,
    sweep_setup,
)
from lens_safety.calibration.sweep import failure_reason, fallback_point, measure_sweep
from lens_safety.edits import edit_method, make_spec
from lens_safety.errors import LensSafetyError
from lens_safety.models import ChatModel
from lens_safety.prompts import PromptSource
from lens_safety.vectors import DirectionLike


def calibrate_alpha(
    model: ChatModel,
    direction: DirectionLike,
    harmful_val: PromptSource,
    harmless_val: PromptSource,
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
        method: an edit method with a calibration grid (``default_alphas`` in
            :data:`~lens_safety.edits.methods.EDIT_METHODS`): ``rosi`` (``W + alpha s w_bar^T``) or
            ``amplify`` (``(I + alpha s s^T) W``).
        alphas: strengths to try (default: the method's ``default_alphas``, :data:`DEFAULT_ALPHAS`;
            swept in increasing order).
        layers: blocks whose writers are edited (``None``: all); targets: writer kinds or names.
        options: the bounds and the measurement (:class:`SweepOptions`); defaults
            ``target_refusal=0.9``, ``max_over_refusal=0.1`` (the accepted RISE over the unedited
            model, ``over_refusal_relative=True``), ``max_kl=0.1``, ``max_new_tokens=24``,
            ``batch_size=16``, the template's system prompt, the substring judge, no progress bar.
    """
    bounds, measure = sweep_setup(options, CalibrationBounds(), max_new_tokens=24)
    kind = edit_method(method)
    if kind.default_alphas is None:
        raise LensSafetyError(
            f"alpha calibration needs a strength-controlled method, got '{method}'",
            f"use {' or '.join(DEFAULT_ALPHAS)}",
        )
    grid = kind.check_sweep(kind.default_alphas if alphas is None else alphas)
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
