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
