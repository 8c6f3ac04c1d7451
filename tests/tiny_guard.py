"""A tiny random Llama carrying Llama Guard 3's chat template (``test_guard_judge.GUARD_TEMPLATE``):
a guard judge whose formatting and token plumbing are real and whose verdicts are random."""

from __future__ import annotations

from pathlib import Path


def make_tiny_guard(out_dir: Path, tokenizer_dir: Path, seed: int = 3) -> Path:
    """Write the tiny guard to ``out_dir`` (its name is the judge's: ``llama-guard:<dir name>``)."""
    from test_guard_judge import GUARD_TEMPLATE
    from transformers import AutoTokenizer

    from lens_safety.testing import make_tiny_model

    out = make_tiny_model("llama", out_dir, tokenizer_dir, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.chat_template = GUARD_TEMPLATE
    tokenizer.save_pretrained(str(out))
    return out
