"""Generation damage: signs that an edit broke the model's text, measured on its completions.

Per completion (words = whitespace tokens, lower-cased):

* ``repetitive`` — the fraction of repeated word 4-grams, ``1 - distinct / total``, exceeds
  :data:`REPETITION_THRESHOLD` (a completion stuck in a loop); completions under 8 words never count;
* ``empty`` — nothing but whitespace after decoding;
* ``truncated`` — hit ``max_new_tokens`` without an end-of-sequence token;
* ``length`` — new tokens before the end-of-sequence token.

Rates come with bootstrap intervals. ``length_change`` is the mean per-prompt difference
``n_tokens(model) - n_tokens(reference)`` when a reference run on the same prompts is given.

Degenerate completions (:func:`is_degenerate`) are the signature of broken decoding rather than of
a damaged model: empty, or at least :data:`DEGENERATE_MIN_TOKENS` new tokens of which one token id
makes up at least :data:`DEGENERATE_TOKEN_SHARE` (``"To-----------"``). When more than
:data:`DEGENERATE_MAJORITY` of a run's completions are degenerate, :func:`degeneration_check`
marks every rate judged on them untrustworthy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.bootstrap import Estimate, bootstrap
from lens_safety.evaluation.generation import Generations
from lens_safety.records import Record

REPETITION_THRESHOLD = 0.5
_NGRAM = 4
_MIN_WORDS = 8
DEGENERATE_MIN_TOKENS = 4
DEGENERATE_TOKEN_SHARE = 0.75
DEGENERATE_MAJORITY = 0.5


def repeated_ngram_fraction(text: str, n: int = _NGRAM) -> float:
    """``1 - distinct n-grams / total n-grams`` over lower-cased words (0 for short texts)."""
    words = text.lower().split()
    if len(words) < max(_MIN_WORDS, n + 1):
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


@dataclass
class DamageResult(Record):
    """Repetition, empty and truncated rates, mean length and (optionally) mean length change."""

    repetition_rate: Estimate
    empty_rate: Estimate
    truncated_rate: Estimate
    mean_length: Estimate
    length_change: Estimate | None = None


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


def is_degenerate(token_ids: list[int], text: str) -> bool:
    """Empty, or >= ``DEGENERATE_MIN_TOKENS`` tokens with one id >= ``DEGENERATE_TOKEN_SHARE`` of them."""
    if not text.strip():
        return True
    if len(token_ids) < DEGENERATE_MIN_TOKENS:
        return False
    most = max(token_ids.count(t) for t in set(token_ids))
    return most >= DEGENERATE_TOKEN_SHARE * len(token_ids)


@dataclass
class DegenerationCheck:
    """How many completions of a run are degenerate, and whether rates judged on them can be trusted."""

    degenerate: int
    n: int
    examples: list[str]

    @property
    def fraction(self) -> float:
        return self.degenerate / self.n if self.n else 0.0

    @property
    def trustworthy(self) -> bool:
        return self.fraction <= DEGENERATE_MAJORITY

    def message(self) -> str:
        """One line for stderr: what was seen and what it means."""
        shown = "; ".join(repr(x[:40]) for x in self.examples[:2])
        return (
            f"{self.degenerate} of {self.n} completions are empty or one repeated token (e.g. {shown}): "
            "decoding is broken, so refusal rates judged on them are untrustworthy; run `lens-safety doctor`"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "degenerate": self.degenerate,
            "n": self.n,
            "fraction": self.fraction,
            "trustworthy": self.trustworthy,
            "rule": f"empty, or >= {DEGENERATE_MIN_TOKENS} tokens with one token id >= "
            f"{DEGENERATE_TOKEN_SHARE:.0%} of them; untrustworthy above {DEGENERATE_MAJORITY:.0%}",
            "examples": self.examples,
        }


def degeneration_check(runs: list[Generations]) -> DegenerationCheck:
    """Count degenerate completions over several generation runs (see :func:`is_degenerate`)."""
    flagged = [
        text
        for run in runs
        for ids, text in zip(run.token_ids, run.completions, strict=True)
        if is_degenerate(ids, text)
    ]
    return DegenerationCheck(len(flagged), sum(len(run) for run in runs), flagged[:5])
