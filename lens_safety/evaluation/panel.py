"""Several judges on the same completions: each one's rates, and how often every pair agrees.

The first judge of an evaluation decides the headline rates; every further judge re-judges the
same completions (harmful, harmless and jailbreak), so their rates differ only by the judge.
For two judges ``a`` and ``b`` over the same ``n`` completions:

* ``agreement = (1/n) sum_i [a_i == b_i]`` on the ``refused`` decision (a harm judge's
  ``refused`` is "judged safe"), with a percentile bootstrap interval over completions;
* Cohen's ``kappa = (p_o - p_e) / (1 - p_e)`` with ``p_e = p_a p_b + (1 - p_a)(1 - p_b)``
  (``p_a``, ``p_b`` the two refusal rates); ``nan`` when ``p_e = 1``.

Each record names both judges and the question each answered, so a refusal judge compared with a
harm judge reads as "refused" against "judged safe".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lens_safety.evaluation.bootstrap import Estimate, bootstrap
from lens_safety.evaluation.judges import Judge, judge_question
from lens_safety.evaluation.metrics import RateResult, rate_of_completions


@dataclass
class JudgeRates:
    """One judge's rates on the evaluation's completions, keyed by prompt set."""

    judge: str
    question: str
    rates: dict[str, RateResult]

    def decisions(self) -> list[bool]:
        """Every ``refused`` decision, prompt sets in key order."""
        return [r for key in sorted(self.rates) for r in self.rates[key].refused]

    def summary(self, prompt_sets: dict[str, str | None]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, result in self.rates.items():
            estimate = result.estimate
            if key == "jailbreak":
                success = bootstrap([0.0 if r else 1.0 for r in result.refused])
                out["jailbreak_asr"] = label(success, self.judge, self.question, prompt_sets.get(key))
            else:
                out[f"{key}_refusal_rate"] = label(estimate, self.judge, self.question, prompt_sets.get(key))
        return out


def label(estimate: Estimate, judge: str, question: str, prompts: str | None) -> dict[str, Any]:
    """An estimate's dict with the judge, the question it answered and the prompt set named."""
    return {**estimate.to_dict(), "judge": judge, "question": question, "prompts": prompts}


def judge_rates(judge: Judge, sets: dict[str, RateResult]) -> JudgeRates:
    """Re-judge the completions of each prompt set with ``judge``."""
    rates = {
        key: rate_of_completions(result.completions, result.prompts or None, judge)
        for key, result in sets.items()
    }
    return JudgeRates(judge.name, judge_question(judge), rates)


@dataclass
class PairAgreement:
    """Agreement of two judges' ``refused`` decisions on the same completions."""

    a: str
    b: str
    questions: tuple[str, str]
    agreement: Estimate
    kappa: float
    counts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "judges": [self.a, self.b],
            "questions": list(self.questions),
            "agreement": self.agreement.to_dict(),
            "kappa": self.kappa,
            "counts": self.counts,
        }


def pair_agreement(a: JudgeRates, b: JudgeRates) -> PairAgreement:
    """Agreement fraction (bootstrap interval), Cohen's kappa and the 2x2 counts of two judges."""
    da, db = a.decisions(), b.decisions()
    same = [1.0 if x == y else 0.0 for x, y in zip(da, db, strict=True)]
    n = len(same)
    pa, pb = sum(da) / n, sum(db) / n
    p_e = pa * pb + (1 - pa) * (1 - pb)
    p_o = sum(same) / n
    kappa = (p_o - p_e) / (1 - p_e) if p_e < 1 else math.nan
    counts = {
        "both_refused": sum(x and y for x, y in zip(da, db, strict=True)),
        "only_first": sum(x and not y for x, y in zip(da, db, strict=True)),
        "only_second": sum(y and not x for x, y in zip(da, db, strict=True)),
        "neither": sum(not x and not y for x, y in zip(da, db, strict=True)),
    }
    return PairAgreement(a.judge, b.judge, (a.question, b.question), bootstrap(same), kappa, counts)


def pairwise(panel: Sequence[JudgeRates]) -> list[PairAgreement]:
    """Agreement of every pair of judges, in panel order."""
    return [pair_agreement(x, y) for i, x in enumerate(panel) for y in panel[i + 1 :]]
