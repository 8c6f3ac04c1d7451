"""Arditi-style selection of one refusal direction among the (layer, position) candidates.

Refusal metric (no generation): at the last prompt position, with next-token probabilities ``p``
(float64) and refusal-start tokens ``R``, ``m = log(sum_{t in R} p_t + eps) - log(sum_{t not in R} p_t + eps)``,
``eps = 1e-8``. ``R`` is derived from the tokenizer (first token of "I", "As", "Sorry", " I", …)
unless given.

Scores per candidate ``(l, i)`` on validation prompts (default 16 + 16):

* ``bypass`` — mean ``m`` on harmful prompts with ``r_hat`` ablated at every layer and position
  (lower is better). ``ablation="affine"`` sets the projection to the harmless mean projection of
  each layer instead of 0 (:func:`~lens_safety.interventions.ablate_direction` with ``reference``);
* ``induce`` — mean ``m`` on harmless prompts with the raw ``r`` added at layer ``l`` (all positions);
* ``kl`` — the first-token KL ``KL(p_baseline || p_ablated)`` in nats
  (:func:`~lens_safety.evaluation.divergence.kl_from_log_probs`), averaged over harmless prompts.

The rule choosing among the scored candidates is :func:`~lens_safety.selection_rule.choose_selection`:
argmin ``bypass`` subject to ``induce > 0``, ``kl < 0.1``, ``l < 0.8 L`` and finite scores, with the
fallbacks described there. Every candidate's row records why it was rejected and where 0 sits
between the class means (``zero_at``: 0 = harmless mean, 1 = harmful mean; > 1 means plain ablation
moves harmless prompts PAST the harmful mean, toward refusal).

Separation and accuracy use the WHOLE validation split (a read pass, cheap); the steering scores use
its first ``n_val`` prompts per class. Every scoring pass computes the prompts' shared chat-template
prefix once per batch (:func:`~lens_safety.forward_pass.forward_rows`; both interventions treat all
positions alike), which equals the plain batched pass up to float rounding.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from lens_safety.activations import Activations, collect_activations
from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.divergence import last_logits, last_token_log_probs, mean_first_token_kl
from lens_safety.evaluation.separation import accuracy, effect_size
from lens_safety.interventions import ablate_direction, add_direction
from lens_safety.models import ChatModel
from lens_safety.progress import track
from lens_safety.prompts import PromptSet, PromptSource
from lens_safety.selection_rule import (
    CandidateScore,
    NoRefusalWarning,
    Selection,
    SelectionConfig,
    rejections,
)
from lens_safety.selection_rule import choose_selection as _choose

if TYPE_CHECKING:
    from lens_safety.directions.extraction import Candidates

__all__ = [
    "EPS",
    "REFUSAL_STARTS",
    "CandidateScore",
    "NoRefusalWarning",
    "Selection",
    "SelectionConfig",
    "last_logits",
    "mean_kl",
    "mean_metric",
    "refusal_metric",
    "refusal_token_ids",
    "select_direction",
]

#: words whose first token starts a refusal (with and without a leading space)
REFUSAL_STARTS: tuple[str, ...] = (
    "I",
    "As",
    "Sorry",
    "I'm",
    "Unfortunately",
    " I",
    " As",
    " Sorry",
    " Unfortunately",
)
EPS = 1e-8


def refusal_token_ids(tokenizer: Any, words: Sequence[str] | None = None) -> list[int]:
    """Sorted unique first-token ids of the refusal-start words (default :data:`REFUSAL_STARTS`)."""
    ids = set()
    for word in words or REFUSAL_STARTS:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if tokens:
            ids.add(int(tokens[0]))
    if not ids:
        raise LensSafetyError(
            "no refusal-start tokens could be derived", "pass refusal_tokens=['I', 'Sorry', ...]"
        )
    return sorted(ids)


def refusal_metric(
    logits: Float[torch.Tensor, "batch d_vocab"], refusal_ids: Sequence[int]
) -> Float[torch.Tensor, " batch"]:
    """``log(sum_R p + eps) - log(sum_notR p + eps)`` from last-position logits, in float64."""
    probs = torch.softmax(logits.double(), dim=-1)
    in_r = probs[:, list(refusal_ids)].sum(-1)
    return torch.log(in_r + EPS) - torch.log((1 - in_r).clamp_min(0) + EPS)


# ------------------------------------------------------------------ forward helpers
def mean_metric(
    model: ChatModel,
    prompts: PromptSet,
    ids: Sequence[int],
    config: SelectionConfig,
    hooks: AbstractContextManager[Any],
) -> float:
    """Mean refusal metric over ``prompts`` under the intervention ``hooks``."""
    with hooks:
        values = [
            refusal_metric(x, ids)
            for x in last_logits(model, prompts, config.batch_size, config.system_prompt, share_prefix=True)
        ]
    return float(torch.cat(values).mean())


def mean_kl(
    model: ChatModel,
    prompts: PromptSet,
    baseline: torch.Tensor,
    config: SelectionConfig,
    hooks: AbstractContextManager[Any],
) -> float:
    """First-token ``KL(baseline || intervened)`` averaged over ``prompts`` (nats)."""
    with hooks:
        logprobs = last_token_log_probs(
            model, prompts, config.batch_size, config.system_prompt, share_prefix=True
        )
    return mean_first_token_kl(baseline, logprobs)


def _zero_at(harmful_projection: float, harmless_projection: float) -> float:
    gap = harmful_projection - harmless_projection
    return -harmless_projection / gap if gap != 0 else math.nan


def _check_extracted(candidates: Candidates, layers: Sequence[int], positions: Sequence[int]) -> None:
    missing = [x for x in layers if x not in candidates.layers] + [
        p for p in positions if p not in candidates.positions
    ]
    if missing:
        raise LensSafetyError(
            f"no extracted candidate for layer/position {missing}",
            "score only extracted layers and positions",
        )


def _score(
    model: ChatModel,
    candidates: Candidates,
    layer: int,
    pos: int,
    config: SelectionConfig,
    harmful: PromptSet,
    harmless: PromptSet,
    ids: list[int],
    baseline: Float[torch.Tensor, "n vocab"],
    val_reads: list[Activations],
    max_layer: float,
) -> CandidateScore:
    """Bypass, induce, KL and validation separation of the candidate at ``(layer, pos)``."""
    if float(candidates.vector(layer, pos).norm()) == 0:  # e.g. layer 0 at a fixed template token
        nan = math.nan
        return CandidateScore(
            layer, pos, nan, nan, nan, nan, 0.0, 0.0, nan, ["zero vector (classes identical here)"]
        )
    unit = candidates.unit(layer, pos)
    reference: float | dict[int, float] = (
        candidates.reference_projections(layer, pos) if config.ablation == "affine" else 0.0
    )
    ablated = ablate_direction(model, unit.float(), reference=reference)
    bypass = mean_metric(model, harmful, ids, config, ablated)
    added = add_direction(model, candidates.vector(layer, pos).float(), layer=layer)
    induce = mean_metric(model, harmless, ids, config, added)
    kl = mean_kl(
        model, harmless, baseline, config, ablate_direction(model, unit.float(), reference=reference)
    )
    val_h, val_b = ((r.at(layer, pos).double() @ unit).numpy() for r in val_reads)
    p, k = candidates.positions.index(pos), candidates.layers.index(layer)
    hp, bp = float(candidates.harmful_projection[p, k]), float(candidates.harmless_projection[p, k])
    reasons = rejections(bypass, induce, kl, layer, max_layer, config)
    sep, val_accuracy = effect_size(val_h, val_b), accuracy(val_h, val_b, 0.5 * (hp + bp))
    return CandidateScore(
        layer, pos, bypass, induce, kl, sep, hp, bp, _zero_at(hp, bp), reasons, val_accuracy
    )


# ------------------------------------------------------------------ selection
def select_direction(
    model: ChatModel,
    candidates: Candidates,
    val_harmful: PromptSource,
    val_harmless: PromptSource,
    config: SelectionConfig | None = None,
    *,
    progress: bool = False,
) -> Selection:
    """Score candidates on validation prompts and pick one (see the module docstring)."""
    config = config or SelectionConfig(system_prompt=candidates.system_prompt)
    all_harmful, all_harmless = PromptSet.load(val_harmful), PromptSet.load(val_harmless)
    harmful, harmless = all_harmful.head(config.n_val), all_harmless.head(config.n_val)
    if len(harmful) < 2 or len(harmless) < 2:
        raise LensSafetyError(
            "selection needs at least 2 validation prompts per class",
            "give more prompts or pass --layer/--position",
        )
    if config.stride < 1:
        raise LensSafetyError(
            f"selection stride must be >= 1, got {config.stride}", "pass 1 (every layer) or more"
        )
    layers = tuple(candidates.layers if config.layers is None else config.layers)
    positions = tuple(config.positions)
    _check_extracted(candidates, layers, positions)
    ids = refusal_token_ids(model.tokenizer, config.refusal_tokens)
    base_h = mean_metric(model, harmful, ids, config, nullcontext())
    # one pass over the harmless prompts gives their baseline metric and the KL reference
    harmless_logits = torch.cat(
        list(last_logits(model, harmless, config.batch_size, config.system_prompt, share_prefix=True))
    )
    base_b = float(refusal_metric(harmless_logits, ids).mean())
    baseline = torch.log_softmax(harmless_logits, -1)
    val_reads = [
        collect_activations(
            model,
            p,
            layers=layers,
            positions=positions,
            batch_size=config.batch_size,
            system_prompt=config.system_prompt,
        )
        for p in (all_harmful, all_harmless)
    ]
    max_layer = config.max_layer_fraction * model.n_layers
    measured = (harmful, harmless, ids, baseline, val_reads, max_layer)

    def score(layer: int, pos: int) -> CandidateScore:
        return _score(model, candidates, layer, pos, config, *measured)

    grid = [(layer, pos) for pos in positions for layer in layers[:: config.stride]]
    scores = [score(*cell) for cell in track(grid, "scoring candidates", total=len(grid), enabled=progress)]
    if config.stride > 1:  # refine: the unscored layers next to the coarse grid's choice
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoRefusalWarning)
            coarse = _choose(scores, config, max_layer, base_h, base_b, ids)
        near = [(x, coarse.position) for x in (coarse.layer - 1, coarse.layer + 1) if x in layers]
        scores += [score(*cell) for cell in near if cell not in grid]
        scores.sort(key=lambda c: (positions.index(c.position), layers.index(c.layer)))
    return _choose(scores, config, max_layer, base_h, base_b, ids)
