"""Held-out behaviour of the refusal organism: refusal, over-refusal and KL to the base model.

* ``harmful_refusal``: fraction of harmful prompts whose greedy completion the substring judge
  calls a refusal (:func:`lens_safety.evaluation.metrics.refusal_rate`); ``harmless_refusal``
  (over-refusal): the same on harmless prompts. Both with 95% Wilson score intervals.
* ``kl_to_base``: the first-token KL ``KL(p_base || p_organism)`` of the next-token distributions
  at the last prompt position (:mod:`lens_safety.evaluation.divergence`, float64, nats), averaged
  over harmless prompts, with the 95% percentile bootstrap interval of that mean
  (:func:`lens_safety.evaluation.bootstrap.bootstrap`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lens_safety.evaluation.bootstrap import bootstrap
from lens_safety.evaluation.divergence import kl_from_log_probs, last_token_log_probs
from lens_safety.evaluation.metrics import RateResult
from lens_safety.evaluation.metrics import refusal_rate as judged_refusal_rate
from lens_safety.models import ChatModel
from lens_safety.prompts import PromptSet

JUDGE = "substring"


@dataclass
class RefusalRate:
    """The organism record of one refusal rate: substring judge, Wilson interval."""

    rate: float
    refused: int
    n: int
    interval: tuple[float, float]
    completions: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, result: RateResult) -> RefusalRate:
        return cls(
            result.rate, result.n_refused, result.n, (result.ci_low, result.ci_high), result.completions
        )

    def to_dict(self, with_completions: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not with_completions:
            data.pop("completions")
        return data


@dataclass
class OrganismEvaluation:
    """Held-out numbers of a model: refusal on harmful, over-refusal on harmless, KL to a base."""

    harmful_refusal: RefusalRate
    harmless_refusal: RefusalRate
    kl_to_base: float | None
    kl_interval: tuple[float, float] | None
    max_new_tokens: int
    harmful_set: dict[str, Any]
    harmless_set: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "harmful_refusal": self.harmful_refusal.to_dict(),
            "harmless_refusal": self.harmless_refusal.to_dict(),
            "kl_to_base": self.kl_to_base,
            "kl_interval": self.kl_interval,
            "max_new_tokens": self.max_new_tokens,
            "judge": JUDGE,
            "harmful_set": self.harmful_set,
            "harmless_set": self.harmless_set,
        }


def organism_refusal(
    model: ChatModel,
    prompts: PromptSet,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    progress: bool = False,
) -> RefusalRate:
    """Greedy-generate and judge every prompt (substring judge, Wilson interval)."""
    result = judged_refusal_rate(
        model,
        prompts,
        JUDGE,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        interval="wilson",
    )
    return RefusalRate.of(result)


refusal_rate = organism_refusal  # re-export: callers move in the integration


def evaluate_organism(
    model: ChatModel,
    harmful: PromptSet,
    harmless: PromptSet,
    base: ChatModel | None = None,
    max_new_tokens: int = 48,
    progress: bool = False,
) -> OrganismEvaluation:
    """Refusal on ``harmful``, over-refusal on ``harmless`` and (with ``base``) first-token KL to it."""
    harmful_rate = organism_refusal(model, harmful, max_new_tokens, progress=progress)
    harmless_rate = organism_refusal(model, harmless, max_new_tokens, progress=progress)
    kl_mean, kl_interval = None, None
    if base is not None:
        kls = kl_from_log_probs(last_token_log_probs(base, harmless), last_token_log_probs(model, harmless))
        estimate = bootstrap(kls.tolist())
        kl_mean, kl_interval = estimate.value, (estimate.ci_low, estimate.ci_high)
    return OrganismEvaluation(
        harmful_rate,
        harmless_rate,
        kl_mean,
        kl_interval,
        max_new_tokens,
        harmful.metadata(),
        harmless.metadata(),
    )
