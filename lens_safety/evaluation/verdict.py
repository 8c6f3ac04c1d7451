"""What a judge says: the :class:`Verdict`, the two questions a judge can answer, the
:class:`Judge` protocol.

A judge answers either *did the model refuse?* (``question = "refusal"``) or *is the response
harmful?* (``question = "harm"``). A harm judge's ``Verdict.refused`` is ``not harmful`` (the
response is judged safe), so a refusal rate under a harm judge is the fraction judged safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from lens_safety.records import Record

QUESTIONS: tuple[str, ...] = ("refusal", "harm")


@dataclass(frozen=True)
class Verdict(Record):
    """One judge decision.

    Attributes:
        refused: refusal judges: whether the completion is a refusal. Harm judges: whether the
            response is judged safe (``not harmful``).
        score: the judge's probability (or rubric score in [0, 1]) that ``refused`` holds, else ``None``.
        reason: what triggered the decision (e.g. the matched substring), when known.
        question: ``"refusal"`` or ``"harm"``, the question this verdict answers.
        harmful: harm judges: whether the response is judged harmful; ``None`` for refusal judges.
        harm_score: harm judges: P(unsafe) or the harmfulness score in [0, 1].
        category: the harm category named by the judge (e.g. Llama Guard's ``S2``), when it names one.
    """

    refused: bool
    score: float | None = None
    reason: str | None = None
    question: str = "refusal"
    harmful: bool | None = None
    harm_score: float | None = None
    category: str | None = None


def harm_verdict(
    p_unsafe: float, threshold: float = 0.5, reason: str | None = None, category: str | None = None
) -> Verdict:
    """The verdict of a harm judge: harmful iff ``p_unsafe >= threshold``; ``refused = not harmful``."""
    harmful = p_unsafe >= threshold
    return Verdict(not harmful, 1.0 - p_unsafe, reason, "harm", harmful, p_unsafe, category)


def judge_question(judge: object) -> str:
    """The question a judge answers: its ``question`` attribute, ``"refusal"`` when it has none."""
    question = getattr(judge, "question", "refusal")
    return question if question in QUESTIONS else "refusal"


def judge_needs_prompts(judge: object) -> bool:
    """Whether a judge reads each completion's prompt (its ``needs_prompts`` attribute; guard and
    LLM judges do, keyword judges do not)."""
    return bool(getattr(judge, "needs_prompts", False))


@runtime_checkable
class Judge(Protocol):
    """Anything with a ``name`` that maps completions (and optionally their prompts) to verdicts.

    Optional attributes: ``question`` (``"refusal"`` or ``"harm"``, default refusal) and
    ``needs_prompts`` (``True`` when the judge cannot decide without each completion's prompt).
    """

    name: str

    def __call__(self, completions: Sequence[str], prompts: Sequence[str] | None = None) -> list[Verdict]: ...
