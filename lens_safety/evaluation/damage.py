"""Generation damage: signs that an edit broke the model's text, measured on its completions.

Per completion (words = whitespace tokens, lower-cased):

* ``repetitive`` — the fraction of repeated word 4-grams, ``1 - distinct / total``, exceeds
  :data:`REPETITION_THRESHOLD` (a completion stuck in a loop); completions under 8 words never count;
* ``empty`` — nothing but whitespace after decoding;
* ``truncated`` — hit ``max_new_tokens`` without an end-of-sequence token;
* ``length`` — new tokens before the end-of-sequence token.

Rates come with bootstrap intervals. ``length_change`` is the mean per-prompt difference
``n_tokens(model) - n_tokens(reference)`` when a reference run on the same prompts is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.bootstrap import Estimate, bootstrap
from lens_safety.evaluation.generation import Generations

REPETITION_THRESHOLD = 0.5
_NGRAM = 4
_MIN_WORDS = 8


def repeated_ngram_fraction(text: str, n: int = _NGRAM) -> float:
    """``1 - distinct n-grams / total n-grams`` over lower-cased words (0 for short texts)."""
    words = text.lower().split()
    if len(words) < max(_MIN_WORDS, n + 1):
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


@dataclass
class DamageResult:
    """Repetition, empty and truncated rates, mean length and (optionally) mean length change."""

    repetition_rate: Estimate
    empty_rate: Estimate
    truncated_rate: Estimate
    mean_length: Estimate
    length_change: Estimate | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "repetition_rate": self.repetition_rate.to_dict(),
            "empty_rate": self.empty_rate.to_dict(),
            "truncated_rate": self.truncated_rate.to_dict(),
            "mean_length": self.mean_length.to_dict(),
        }
        out["length_change"] = self.length_change.to_dict() if self.length_change is not None else None
        return out


def generation_damage(generations: Generations, reference: Generations | None = None) -> DamageResult:
    """Damage metrics of ``generations``; ``reference`` (same prompts) adds the mean length change."""
    repetitive = [float(repeated_ngram_fraction(c) > REPETITION_THRESHOLD) for c in generations.completions]
    empty = [float(not c.strip()) for c in generations.completions]
    change = None
    if reference is not None:
        if reference.prompts != generations.prompts or len(reference) != len(generations):
            raise LensSafetyError(
                "reference generations answer different prompts", "generate the reference on the same prompts"
            )
        change = bootstrap([a - b for a, b in zip(generations.n_tokens, reference.n_tokens, strict=True)])
    return DamageResult(
        repetition_rate=bootstrap(repetitive),
        empty_rate=bootstrap(empty),
        truncated_rate=bootstrap([float(t) for t in generations.truncated]),
        mean_length=bootstrap([float(n) for n in generations.n_tokens]),
        length_change=change,
    )
