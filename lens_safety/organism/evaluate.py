"""Held-out behaviour of the refusal organism: refusal, over-refusal and KL to the base model.

* ``harmful_refusal``: fraction of harmful prompts whose greedy completion the substring judge
  (methods.md §1) calls a refusal; ``harmless_refusal`` (over-refusal): the same on harmless prompts.
  Both with 95% Wilson score intervals.
* ``kl_to_base``: mean over harmless prompts of KL(p_base || p_organism) of the next-token
  distributions at the last prompt position (float64), with a normal 95% interval of the mean.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Float

from lens_safety.activations import forward
from lens_safety.evaluation import SubstringJudge, generate
from lens_safety.models import ChatModel
from lens_safety.progress import track
from lens_safety.prompts import PromptSet


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class RefusalRate:
    """Refusal rate of a prompt set under the substring judge, with its Wilson interval."""

    rate: float
    refused: int
    n: int
    interval: tuple[float, float]
    completions: list[str] = field(default_factory=list, repr=False)

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
            "judge": "substring (methods.md section 1)",
            "harmful_set": self.harmful_set,
            "harmless_set": self.harmless_set,
        }


def refusal_rate(
    model: ChatModel,
    prompts: PromptSet,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    progress: bool = False,
) -> RefusalRate:
    """Greedy-generate and judge every prompt."""
    generations = generate(
        model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    completions = list(generations.completions)
    refused = sum(v.refused for v in SubstringJudge()(completions))
    return RefusalRate(
        refused / len(prompts), refused, len(prompts), wilson_interval(refused, len(prompts)), completions
    )


@torch.no_grad()
def last_token_log_probs(
    model: ChatModel, prompts: PromptSet, batch_size: int = 16, progress: bool = False
) -> Float[torch.Tensor, "n d_vocab"]:
    """float64 next-token log-probabilities at the last prompt position (left-padded batches)."""
    rows = []
    chunks = [list(prompts)[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    for chunk in track(chunks, "next-token distributions", total=len(chunks), enabled=progress):
        logits = forward(model, model.chat.encode(chunk)).logits[:, -1]
        rows.append(torch.log_softmax(logits.to(torch.float64), dim=-1).cpu())
    return torch.cat(rows)


def kl_divergences(
    reference: Float[torch.Tensor, "n d_vocab"], other: Float[torch.Tensor, "n d_vocab"]
) -> Float[torch.Tensor, " n"]:
    """Per-row KL(reference || other) from log-probabilities."""
    return (reference.exp() * (reference - other)).sum(-1)


def evaluate_organism(
    model: ChatModel,
    harmful: PromptSet,
    harmless: PromptSet,
    base: ChatModel | None = None,
    max_new_tokens: int = 48,
    progress: bool = False,
) -> OrganismEvaluation:
    """Refusal on ``harmful``, over-refusal on ``harmless`` and (with ``base``) first-token KL to it."""
    harmful_rate = refusal_rate(model, harmful, max_new_tokens, progress=progress)
    harmless_rate = refusal_rate(model, harmless, max_new_tokens, progress=progress)
    kl_mean, kl_interval = None, None
    if base is not None:
        kls = kl_divergences(
            last_token_log_probs(base, harmless, progress=progress),
            last_token_log_probs(model, harmless, progress=progress),
        )
        kl_mean = float(kls.mean())
        half = 1.96 * float(kls.std()) / math.sqrt(len(kls)) if len(kls) > 1 else float("nan")
        kl_interval = (kl_mean - half, kl_mean + half)
    return OrganismEvaluation(
        harmful_rate,
        harmless_rate,
        kl_mean,
        kl_interval,
        max_new_tokens,
        harmful.metadata(),
        harmless.metadata(),
    )
