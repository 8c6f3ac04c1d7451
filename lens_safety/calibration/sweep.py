"""Measure refusal, over-refusal and first-token KL with each edit applied and reverted.

One greedy generation per prompt and state gives everything: the judged completions, and on the
harmless prompts the first new token's log-probabilities (the logits generation computes at the
last prompt position anyway), so the first-token KL needs no pass of its own. Each batch's shared
chat-template prefix is computed once (:func:`~lens_safety.evaluation.generate`'s
``share_prefix``; the edits are weight edits, the same at every position).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from lens_safety.calibration.results import CalibrationBounds, CalibrationPoint
from lens_safety.edits import applied_edit
from lens_safety.edits.spec import EditSpec
from lens_safety.evaluation.divergence import mean_first_token_kl
from lens_safety.evaluation.generation import Generations, generate
from lens_safety.evaluation.judges import Judge, get_judge
from lens_safety.evaluation.metrics import rate_of_completions
from lens_safety.models import ChatModel
from lens_safety.progress import track
from lens_safety.prompts import PromptSet, PromptSource


@dataclass
class Measurer:
    """Measures refusal / over-refusal / first-token KL (to the first state measured) of the model now."""

    model: ChatModel
    harmful: PromptSet
    harmless: PromptSet
    judge: Judge
    max_new_tokens: int
    batch_size: int
    system_prompt: str | None
    baseline_logprobs: Float[torch.Tensor, "n_harmless vocab"] | None = None

    def _generate(self, prompts: PromptSet, first_log_probs: bool) -> Generations:
        return generate(
            self.model,
            prompts,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            system_prompt=self.system_prompt,
            share_prefix=True,
            first_log_probs=first_log_probs,
        )

    def measure(self) -> tuple[float, float, float]:
        harmful, harmless = self._generate(self.harmful, False), self._generate(self.harmless, True)
        rates = [
            rate_of_completions(g.completions, g.prompt_of_completion, self.judge, generations=g).rate
            for g in (harmful, harmless)
        ]
        logprobs = harmless.first_log_probs
        assert logprobs is not None
        if self.baseline_logprobs is None:
            self.baseline_logprobs = logprobs
        return rates[0], rates[1], mean_first_token_kl(self.baseline_logprobs, logprobs)


def make_point(
    label: str,
    alpha: float,
    direction_layer: int | None,
    blocks: tuple[int, ...] | None,
    values: tuple[float, float, float],
    bounds: CalibrationBounds,
    over_refusal_limit: float,
) -> CalibrationPoint:
    """A measured point with its bound checks (``over_refusal_limit``: see :class:`CalibrationBounds`)."""
    harmful, harmless, kl = values
    return CalibrationPoint(
        label,
        alpha,
        direction_layer,
        blocks,
        harmful,
        harmless,
        kl,
        meets_target=harmful >= bounds.target_refusal,
        within_over_refusal=harmless <= over_refusal_limit + 1e-12,
        within_kl=kl <= bounds.max_kl,
    )


def measure_sweep(
    model: ChatModel,
    specs: Sequence[tuple[str, EditSpec]],
    harmful: PromptSource,
    harmless: PromptSource,
    *,
    bounds: CalibrationBounds,
    judge: Judge | str | None,
    max_new_tokens: int,
    batch_size: int,
    system_prompt: str | None,
    progress: bool,
    more: Callable[[Sequence[CalibrationPoint]], Sequence[tuple[str, EditSpec]]] | None = None,
) -> tuple[CalibrationPoint, list[CalibrationPoint], dict[str, Any]]:
    """Measure the unedited model once, then every spec with its edit applied and reverted.

    ``more`` (adaptive sweeps): called with every point measured so far, it returns further specs
    to measure, and is called again until it returns none.
    """
    harmful_set, harmless_set = PromptSet.load(harmful), PromptSet.load(harmless)
    the_judge = get_judge(judge)
    measurer = Measurer(
        model, harmful_set, harmless_set, the_judge, max_new_tokens, batch_size, system_prompt
    )
    unedited = measurer.measure()
    limit = bounds.over_refusal_limit(unedited[1])
    baseline = make_point("unedited", 0.0, None, (), unedited, bounds, limit)
    points: list[CalibrationPoint] = []
    batch = list(specs)
    while batch:
        for label, spec in track(batch, "calibrating", total=len(batch), enabled=progress):
            with applied_edit(model, spec):
                values = measurer.measure()
            points.append(
                make_point(label, spec.alpha, spec.direction_layer, spec.layers, values, bounds, limit)
            )
        batch = list(more(points)) if more is not None else []
    settings = {
        "n_harmful": len(harmful_set),
        "n_harmless": len(harmless_set),
        "harmful": harmful_set.metadata(),
        "harmless": harmless_set.metadata(),
        "judge": the_judge.name,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "system_prompt": system_prompt,
    }
    return baseline, points, settings


def failure_reason(
    points: Sequence[CalibrationPoint], bounds: CalibrationBounds, what: str, baseline: CalibrationPoint
) -> str:
    reaching = [p for p in points if p.meets_target]
    if not reaching:
        best = max(p.harmful_refusal for p in points)
        return (
            f"no {what} met the bounds: none reached harmful refusal {bounds.target_refusal:g} "
            f"(best {best:.3g})"
        )
    over = sum(not p.within_over_refusal for p in reaching)
    kl = sum(not p.within_kl for p in reaching)
    return (
        f"no {what} met the bounds: the {len(reaching)} reaching harmful refusal {bounds.target_refusal:g} "
        f"broke over-refusal <= {bounds.over_refusal_limit(baseline.harmless_refusal):.3g}"
        f"{' (unedited + ' + format(bounds.max_over_refusal, 'g') + ')' if bounds.over_refusal_relative else ''} "
        f"({over}) or KL <= {bounds.max_kl:g} ({kl})"
    )


def fallback_point(points: Sequence[CalibrationPoint]) -> CalibrationPoint | None:
    safe = [p for p in points if p.within_over_refusal and p.within_kl]
    if not safe:
        return None
    return max(safe, key=lambda p: (p.harmful_refusal, -p.alpha))


def least_collateral(
    points: Sequence[CalibrationPoint],
) -> CalibrationPoint | None:
    passing = [p for p in points if p.passed]
    if not passing:
        return None
    return min(passing, key=lambda p: (p.harmless_refusal, p.harmless_kl, p.n_blocks))


def measure_kwargs(
    judge: Judge | str | None, max_new_tokens: int, batch_size: int, system_prompt: str | None, progress: bool
) -> dict[str, Any]:
    return {
        "judge": judge,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "system_prompt": system_prompt,
        "progress": progress,
    }
