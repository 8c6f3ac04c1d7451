"""Prompt sets the organism demonstration uses beyond the train / val / test splits (specs only:
importing this module loads nothing heavy, so the CLI can show them as defaults)."""

from __future__ import annotations

#: Benign training-only sets added to the harmless prompts of the conditional read directions
#: (benign look-alikes: safety-topic and alarming-word requests). Fixed in advance of the run
#: that adopted it: on validation the sweep then has a point meeting every bound (docs/concepts/rosi.md).
READ_HARMLESS: tuple[str, ...] = ("builtin:harmless_extra", "builtin:harmless_extra_2")
#: (harmful, harmless) held-out pairs the organism and its repairs are also scored on: the third
#: pair was written after the conditional repair's settings were fixed, to confirm them once.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (("builtin:harmful_holdout_3", "builtin:harmless_holdout_3"),)

#: Harmful requests written by other authors on which the organisms are scored, never trained,
#: selected or calibrated on (the test splits of :mod:`lens_safety.external_prompts`).
EXTERNAL_HARMFUL_TEST: tuple[str, ...] = (
    "harmbench:test",
    "advbench:test",
    "donotanswer:malicious_uses:test",
)
#: Benign requests written by other authors: all of MT-Bench's first turns (no part of it is
#: trained, selected or calibrated on, so the whole set is test data).
EXTERNAL_HARMLESS_TEST: tuple[str, ...] = ("mtbench",)
#: The held-out benign split of MT-Bench for organisms that train on ``mtbench:train``
#: (``smollm2-refusal-v3``): its test split, and its validation split for selection.
EXTERNAL_HARMLESS_TEST_SPLIT: tuple[str, ...] = ("mtbench:test",)
EXTERNAL_HARMLESS_VAL: tuple[str, ...] = ("mtbench:val",)
#: The validation splits of the external harmful sets (selection only, never trained on).
EXTERNAL_HARMFUL_VAL: tuple[str, ...] = (
    "harmbench:val",
    "advbench:val",
    "donotanswer:malicious_uses:val",
)
#: External harmful training sets of the ``-v3`` organism (train splits only).
EXTERNAL_HARMFUL_TRAIN: tuple[str, ...] = (
    "harmbench:train",
    "advbench:train",
    "donotanswer:malicious_uses:train",
)
#: The builtin (harmful, harmless) held-out sets an organism keeps its numbers on.
BUILTIN_HELDOUT: tuple[tuple[str, str], ...] = (
    ("builtin:harmful:test", "builtin:harmless:test"),
    ("builtin:harmful_holdout", "builtin:harmless_holdout"),
    ("builtin:harmful_holdout_2", "builtin:harmless_holdout_2"),
    ("builtin:harmful_holdout_3", "builtin:harmless_holdout_3"),
)
