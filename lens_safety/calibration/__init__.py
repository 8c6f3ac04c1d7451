"""Calibrate a weight edit on validation prompts: its strength (alpha), its direction's layer, its blocks.

Every point of a sweep applies the edit in memory (:func:`~lens_safety.edits.applied_edit`, exact
and reverted after the point: the weights are bitwise the originals again) and measures, on
validation prompts formatted with the chat template (``system_prompt``; ``None`` = template
default):

* ``harmful_refusal`` — fraction of harmful prompts whose greedy completion (``max_new_tokens``
  new tokens; refusals show in the first ones) the judge calls a refusal (default: substring judge);
* ``harmless_refusal`` — the same on harmless prompts (over-refusal);
* ``harmless_kl`` — first-token KL: ``mean_i KL(p_base(. | x_i) || p_edit(. | x_i))`` in nats over the
  harmless prompts, of the next-token distributions at the last prompt position (float64), with
  ``p_base`` the unedited model measured once.

The unedited model is measured once (``baseline``). The rule for :func:`calibrate_alpha` is the
issue's: the SMALLEST alpha whose point reaches ``harmful_refusal >= target_refusal`` while
``harmless_refusal <= unedited harmless_refusal + max_over_refusal`` (an edit is judged by the
over-refusal it ADDS; ``over_refusal_relative=False`` makes ``max_over_refusal`` an absolute ceiling)
and ``harmless_kl <= max_kl``. When none does,
``chosen`` is ``None``, ``reason`` says which bound failed, and ``fallback`` is the point with the
highest harmful refusal among those inside both collateral bounds (smallest alpha on ties), or
``None`` when no point stays inside them. :func:`calibrate_layer` and
:func:`calibrate_block_range` have no natural order, so among the points meeting every bound they
choose the lowest over-refusal, then the lowest KL, then the fewest edited blocks.

ROSI's useful alpha is model-specific and LARGE: the edit adds ``alpha * s_hat * mean_k (W x)_k``
and ``|w_bar|`` (the mean row of a writer) is tiny next to ``|W|`` (SmolLM2-135M: ~0.3 vs ~187), so
alphas of 10..100 are typical where ``amplify`` (``(I + a s s^T) W``) needs 0.05..1. The default
alpha grids are log-spaced for that reason; always calibrate per model.
"""

from __future__ import annotations

from lens_safety.calibration.alpha import calibrate_alpha
from lens_safety.calibration.conditional import (
    ConditionalCalibration,
    calibrate_conditional,
    injection_unit,
    projection_gap,
)
from lens_safety.calibration.results import (
    DEFAULT_ALPHAS,
    KL_KIND,
    CalibrationBounds,
    CalibrationPoint,
    CalibrationResult,
    NoAdmissiblePoint,
    SweepOptions,
)
from lens_safety.calibration.structure import Calibrator, block_ranges, calibrate_block_range, calibrate_layer
from lens_safety.calibration.sweep import Measurer

__all__ = [
    "DEFAULT_ALPHAS",
    "KL_KIND",
    "CalibrationBounds",
    "CalibrationPoint",
    "CalibrationResult",
    "Calibrator",
    "ConditionalCalibration",
    "Measurer",
    "NoAdmissiblePoint",
    "SweepOptions",
    "block_ranges",
    "calibrate_alpha",
    "calibrate_block_range",
    "calibrate_conditional",
    "calibrate_layer",
    "injection_unit",
    "projection_gap",
]
