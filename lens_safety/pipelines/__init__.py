"""The library's jobs as functions: each takes typed settings and returns a typed result.

* :func:`run_edit` — ROSI / amplify / abliteration: fit or load a direction, calibrate, edit,
  measure before / after, export a verified Hugging Face directory (:mod:`.edit`);
* :func:`run_conditional` — conditional ROSI, calibrated and exported the same way (:mod:`.conditional`);
* the building blocks both use (prompt splits, the direction, before / after; :mod:`.steps`).

The command line (``lens-safety rosi`` / ``ablate`` / ``conditional-rosi``) only parses its
options into these settings, calls the job and renders the result.
"""

from __future__ import annotations

from lens_safety.pipelines.conditional import (
    DEFAULT_RELATIVE_INJECTIONS,
    ConditionalRun,
    ConditionalSettings,
    default_starts,
    resolve_blocks,
    run_conditional,
)
from lens_safety.pipelines.edit import (
    EDIT_METHODS,
    EditRun,
    EditSettings,
    choose_alpha,
    edit_and_export,
    run_edit,
)
from lens_safety.pipelines.steps import (
    Splits,
    before_after,
    calibration_files,
    check_blocks,
    check_out,
    export_summary,
    load_chat_model,
    load_splits,
    obtain_direction,
    refusal_rates,
)

__all__ = [
    "DEFAULT_RELATIVE_INJECTIONS",
    "EDIT_METHODS",
    "ConditionalRun",
    "ConditionalSettings",
    "EditRun",
    "EditSettings",
    "Splits",
    "before_after",
    "calibration_files",
    "check_blocks",
    "check_out",
    "choose_alpha",
    "default_starts",
    "edit_and_export",
    "export_summary",
    "load_chat_model",
    "load_splits",
    "obtain_direction",
    "refusal_rates",
    "resolve_blocks",
    "run_conditional",
    "run_edit",
]
