"""The refusal rate, with a confidence interval, keeping every completion for inspection.

* :func:`refusal_rate` — generate (greedy by default) and judge with any judge:
  ``rate = (1/n) sum_i refused_i``; on harmful prompts this is the refusal rate, on harmless
  prompts the over-refusal rate.
* :func:`evaluate_refusal` — both at once, reported side by side.
* :func:`rate_of_completions` — judge completions you already have.

``interval`` chooses the 95% interval (:mod:`lens_safety.evaluation.bootstrap`): ``"bootstrap"``
(default), the percentile bootstrap over prompts of the mean of ``refused_i``; or ``"wilson"``, the
Wilson score interval of ``sum_i refused_i`` out of ``n``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, Unpack

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.bootstrap import Estimate, bootstrap, wilson
from lens_safety.evaluation.generation import GenerationEngine, Generations, Intervention, generate
from lens_safety.evaluation.judges import Judge, Verdict, get_judge, run_judge
from lens_safety.models import ChatModel
from lens_safety.prompts import PromptSource

IntervalMethod = Literal["bootstrap", "wilson"]
INTERVALS: tuple[str, ...] = ("bootstrap", "wilson")


class RateSettings(TypedDict, total=False):
    """The keyword settings of :func:`refusal_rate` (its defaults apply to any left out), which
    :func:`evaluate_refusal` and :func:`~lens_safety.evaluation.attack_success_rate` pass on whole."""

    max_new_tokens: int
    batch_size: int
    system_prompt: str | None
    intervention: Intervention | None
    do_sample: bool
    temperature: float
    seed: int | None
    progress: bool
    interval: IntervalMethod
    engine: GenerationEngine | None
    share_prefix: bool


#: the :class:`RateResult` fields its dictionary keeps (the evidence goes in its records)
_SUMMARY_FIELDS = ("rate", "ci_low", "ci_high", "n", "judge", "interval")


@dataclass
class RateResult:
    """A refusal rate over completions, with its bootstrap interval and the evidence.

    Attributes:
        rate: fraction of completions judged refusals.
        ci_low, ci_high: 95% interval of ``rate`` (``interval``: bootstrap or Wilson).
        n: number of completions judged.
        completions: the completions, in prompt order.
        refused: the judge's decision per completion.
        prompts: the instruction of each completion.
        scores: the judge's refusal score per completion (``None`` where it has none).
        judge: the judge's name.
        generations: the generation run (settings, token counts, truncation), when this module generated.
        interval: how ``ci_low`` / ``ci_high`` were computed (``bootstrap`` or ``wilson``).
    """

    rate: float
    ci_low: float
    ci_high: float
    n: int
    completions: list[str]
    refused: list[bool]
    prompts: list[str] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)
    judge: str = "substring"
    generations: Generations | None = field(default=None, repr=False)
    interval: str = "bootstrap"

    @property
    def estimate(self) -> Estimate:
        return Estimate(self.rate, self.ci_low, self.ci_high, self.n)

    @property
    def n_refused(self) -> int:
        """Number of completions judged refusals."""
        return sum(self.refused)

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """One dict per completion: prompt, completion, refused (and ``kind`` when given)."""
        rows = []
        for i, (completion, refused) in enumerate(zip(self.completions, self.refused, strict=True)):
            row: dict[str, Any] = {"prompt": self.prompts[i] if self.prompts else None}
            if kind is not None:
                row["kind"] = kind
            row.update(
                {
                    "completion": completion,
                    "refused": refused,
                    "score": self.scores[i] if self.scores else None,
                }
            )
            if self.generations is not None:
                row["n_tokens"] = self.generations.n_tokens[i]
                row["truncated"] = self.generations.truncated[i]
            rows.append(row)
        return rows

    def to_dict(self, include_completions: bool = True) -> dict[str, Any]:
        """The rate, its interval, the judge and (with ``include_completions``) one record per completion."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _SUMMARY_FIELDS}
        if include_completions:
            out["records"] = self.records()
        return out


def interval_estimate(refused: Sequence[bool], interval: IntervalMethod, seed: int = 0) -> Estimate:
    """The rate of ``refused`` with its 95% interval by ``interval`` (module docstring)."""
    if interval == "bootstrap":
        return bootstrap([float(r) for r in refused], seed=seed)
    if interval == "wilson":
        return wilson(refused)
    raise LensSafetyError(f"unknown interval method '{interval}'", f"use one of {', '.join(INTERVALS)}")


def rate_of_completions(
    completions: Sequence[str],
    prompts: Sequence[str] | None = None,
    judge: Judge | str | None = None,
    *,
    seed: int = 0,
    generations: Generations | None = None,
    interval: IntervalMethod = "bootstrap",
) -> RateResult:
    """Judge existing completions and return the refusal rate with its ``interval``."""
    the_judge = get_judge(judge)
    verdicts: list[Verdict] = run_judge(
        the_judge, list(completions), list(prompts) if prompts is not None else None
    )
    refused = [v.refused for v in verdicts]
    estimate = interval_estimate(refused, interval, seed)
    return RateResult(
        rate=estimate.value,
        ci_low=estimate.ci_low,
        ci_high=estimate.ci_high,
        n=estimate.n,
        completions=list(completions),
        refused=refused,
        prompts=list(prompts) if prompts is not None else [],
        scores=[v.score for v in verdicts],
        judge=the_judge.name,
        generations=generations,
        interval=interval,
    )


def refusal_rate(
    model: ChatModel,
    prompts: PromptSource,
    judge: Judge | str | None = None,
    *,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    system_prompt: str | None = None,
    intervention: Intervention | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
    progress: bool = False,
    interval: IntervalMethod = "bootstrap",
    engine: GenerationEngine | None = None,
    share_prefix: bool = False,
) -> RateResult:
    """Generate a completion per prompt and return the fraction the judge calls refusals.

    Greedy decoding by default (deterministic). ``judge``: any judge (default
    :class:`SubstringJudge`); ``interval``: ``"bootstrap"`` or ``"wilson"`` (module docstring);
    ``engine``: generate with another engine (e.g. vLLM, :func:`~lens_safety.evaluation.generate`);
    ``share_prefix``: compute each batch's shared chat-template prefix once (same completions up to
    float rounding; only under hooks that treat every position alike: see
    :func:`~lens_safety.evaluation.generate`).
    """
    if interval not in INTERVALS:
        raise LensSafetyError(f"unknown interval method '{interval}'", f"use one of {', '.join(INTERVALS)}")
    gens = generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        system_prompt=system_prompt,
        do_sample=do_sample,
        temperature=temperature,
        seed=seed,
        intervention=intervention,
        progress=progress,
        engine=engine,
        share_prefix=share_prefix,
    )
    return rate_of_completions(
        gens.completions, gens.prompt_of_completion, judge, generations=gens, interval=interval
    )


@dataclass
class RefusalEvaluation:
    """Refusal on harmful prompts next to over-refusal on harmless prompts."""

    harmful: RateResult
    harmless: RateResult

    def records(self) -> list[dict[str, Any]]:
        return self.harmful.records("harmful") + self.harmless.records("harmless")

    def to_dict(self, include_completions: bool = True) -> dict[str, Any]:
        return {
            "harmful_refusal_rate": self.harmful.to_dict(include_completions),
            "harmless_refusal_rate": self.harmless.to_dict(include_completions),
        }


def evaluate_refusal(
    model: ChatModel,
    harmful: PromptSource,
    harmless: PromptSource,
    judge: Judge | str | None = None,
    **settings: Unpack[RateSettings],
) -> RefusalEvaluation:
    """Refusal rate on ``harmful`` and over-refusal rate on ``harmless`` prompts, same judge and
    same ``settings`` (any keyword of :func:`refusal_rate`: ``max_new_tokens=48``,
    ``batch_size=16``, ``share_prefix`` …)."""
    the_judge = get_judge(judge)
    return RefusalEvaluation(
        harmful=refusal_rate(model, harmful, the_judge, **settings),
        harmless=refusal_rate(model, harmless, the_judge, **settings),
    )
