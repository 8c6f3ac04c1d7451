"""Several refusal judges measured against the same hand labels, on subsets, with intervals.

For each subset of the labelled pairs (``all``, ``long`` answers of at least
:data:`~lens_safety.evaluation.judge_data.LONG_ANSWER_WORDS` words, and any other named subset)
and each judge: the confusion counts and precision / recall / accuracy with 95% Wilson intervals
(:func:`~lens_safety.evaluation.agreement.judge_agreement`, prompts passed). For the first judge
against each other judge: the paired accuracy difference ``mean_i (c1_i - c2_i)`` (``c_i`` = 1
when judge decides pair ``i`` as labelled) with a 95% percentile bootstrap interval over pairs
(:func:`~lens_safety.evaluation.bootstrap.bootstrap`, seed 0). Every judge decides each pair once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lens_safety.evaluation.agreement import Agreement, LabelledSet, judge_agreement
from lens_safety.evaluation.bootstrap import Estimate, bootstrap
from lens_safety.evaluation.judge_data import LabelledPair
from lens_safety.evaluation.judges import Judge, get_judge, run_judge
from lens_safety.evaluation.verdict import Verdict, judge_question

Subset = Callable[[LabelledPair], bool]
DEFAULT_SUBSETS: dict[str, Subset] = {"all": lambda p: True, "long": lambda p: p.long}


@dataclass
class _Remembered:
    """A judge whose verdicts were computed once for every pair (looked up by prompt and completion)."""

    name: str
    question: str
    verdicts: dict[tuple[str | None, str], Verdict]

    def __call__(self, completions: Sequence[str], prompts: Sequence[str] | None = None) -> list[Verdict]:
        keys = [(None if prompts is None else prompts[i], c) for i, c in enumerate(completions)]
        return [self.verdicts[key] for key in keys]


@dataclass
class JudgeComparison:
    """Agreement of every judge with the labels per subset, and the first judge's paired differences."""

    judges: list[str]
    source: str
    subsets: dict[str, list[Agreement]]
    differences: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    with_prompts: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "judges": self.judges,
            "source": self.source,
            "with_prompts": self.with_prompts,
            "subsets": {
                name: {"n": rows[0].n if rows else 0, "judges": [a.to_dict() for a in rows]}
                for name, rows in self.subsets.items()
            },
            "accuracy_difference": {
                name: {other: est.to_dict() for other, est in diffs.items()}
                for name, diffs in self.differences.items()
            },
        }

    def table(self) -> str:
        """A plain-text table: one line per (subset, judge), then the paired differences."""
        lines = [
            f"labels: {self.source}; prompts passed to the judges: {'yes' if self.with_prompts else 'no'}"
        ]
        for name, rows in self.subsets.items():
            if not rows:
                continue
            positives = rows[0].tp + rows[0].fn
            lines.append(f"\n[{name}] n = {rows[0].n} ({positives} refusals)")
            lines.append(f"{'judge':<18} {'accuracy':<22} {'precision':<22} recall")
            for a in rows:
                cells = [
                    f"{e.value:.3f} [{e.ci_low:.3f}, {e.ci_high:.3f}]"
                    for e in (a.accuracy_estimate, a.precision_estimate, a.recall_estimate)
                ]
                lines.append((f"{a.judge:<18} " + " ".join(f"{c:<22}" for c in cells)).rstrip())
            for other, est in self.differences.get(name, {}).items():
                lines.append(
                    f"accuracy {self.judges[0]} - {other}: {est.value:+.3f} "
                    f"[{est.ci_low:+.3f}, {est.ci_high:+.3f}] (paired bootstrap)"
                )
        return "\n".join(lines)


def compare_judges(
    judges: Sequence[str | Judge],
    pairs: Sequence[LabelledPair],
    *,
    subsets: dict[str, Subset] | None = None,
    with_prompts: bool = True,
    source: str = "labelled pairs",
) -> JudgeComparison:
    """Measure every judge on every subset of ``pairs`` (module docstring)."""
    the_judges = [get_judge(j) for j in judges]
    names = [j.name for j in the_judges]
    prompts = [p.prompt for p in pairs] if with_prompts else None
    completions = [p.response for p in pairs]
    remembered = []
    for judge, name in zip(the_judges, names, strict=True):
        verdicts = run_judge(judge, completions, prompts)
        keys = [(None if prompts is None else prompts[i], c) for i, c in enumerate(completions)]
        question = judge_question(judge)
        remembered.append(_Remembered(name, question, dict(zip(keys, verdicts, strict=True))))
    result = JudgeComparison(names, source, {}, {}, with_prompts)
    for subset, keep in (subsets or DEFAULT_SUBSETS).items():
        chosen = [p for p in pairs if keep(p)]
        if not chosen:
            result.subsets[subset] = []
            continue
        data = LabelledSet(
            [p.response for p in chosen],
            [p.label for p in chosen],
            [p.prompt for p in chosen] if with_prompts else None,
            "refusal",
            source,
        )
        result.subsets[subset] = [judge_agreement(judge, data) for judge in remembered]
        correct = [
            [
                float(v.refused == p.label)
                for v, p in zip(judge(data.completions, data.prompts), chosen, strict=True)
            ]
            for judge in remembered
        ]
        result.differences[subset] = {
            names[k]: bootstrap([a - b for a, b in zip(correct[0], correct[k], strict=True)])
            for k in range(1, len(remembered))
        }
    return result
