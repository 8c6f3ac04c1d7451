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

Rule: argmin ``bypass`` subject to ``induce > 0``, ``kl < 0.1``, ``l < 0.8 L`` and finite scores.
Every candidate's row records why it was rejected and where 0 sits between the class means
(``zero_at``: 0 = harmless mean, 1 = harmful mean; > 1 means plain ablation moves harmless prompts
PAST the harmful mean, toward refusal). When nothing passes — a model that does not refuse — the
result says so and falls back (``fallback`` is True). For a model that DOES refuse, the layer bound
is relaxed first: if candidates at or beyond ``0.8 L`` pass every other filter (refusal mediated
late, as in a refusal fine-tune of late blocks), the one with the lowest ``bypass`` among them is
chosen and the message says so. Otherwise — or for a model that does not refuse — the candidate with
the best held-out separation among layers ``< 0.8 L`` is chosen: the highest validation
accuracy of ``r_hat . x > midpoint of the training class-mean projections`` (the rule the direction
is reported with), ties broken by Cohen's d of the validation projections, then the earlier layer.
Separation and accuracy use the WHOLE validation split (a read pass, cheap); the steering scores use
its first ``n_val`` prompts per class. Every scoring pass computes the prompts' shared chat-template
prefix once per batch (:func:`~lens_safety.activations.forward_rows`; both interventions treat all
positions alike), which equals the plain batched pass up to float rounding.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float

from lens_safety.activations import Activations, collect_activations
from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.divergence import last_logits, last_token_log_probs, mean_first_token_kl
from lens_safety.evaluation.separation import accuracy, effect_size
from lens_safety.interventions import ablate_direction, add_direction
from lens_safety.progress import track
from lens_safety.prompts import PromptSet

if TYPE_CHECKING:
    from lens_safety.directions.extraction import Candidates

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


class NoRefusalWarning(UserWarning):
    """No candidate passed the selection filters; the fallback rule was used."""


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


@dataclass
class SelectionConfig:
    """What selection scores and how (defaults keep it affordable on CPU).

    ``stride`` > 1 scores every ``stride``-th layer of ``layers`` (from the first), then the two
    layers next to the one the rule picks among those, and applies the rule to all of them.
    """

    layers: Sequence[int] | None = None
    positions: Sequence[int] = (-1,)
    n_val: int = 16
    batch_size: int = 16
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    max_layer_fraction: float = 0.8
    ablation: Literal["zero", "affine"] = "zero"
    refusal_tokens: Sequence[str] | None = None
    system_prompt: str | None = None
    stride: int = 1

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = None if self.layers is None else list(self.layers)
        out["positions"] = list(self.positions)
        out["refusal_tokens"] = None if self.refusal_tokens is None else list(self.refusal_tokens)
        return out


@dataclass
class CandidateScore:
    """One scored candidate: scores, class-mean projections and why it was (not) chosen."""

    layer: int
    position: int
    bypass: float
    induce: float
    kl: float
    separation: float
    harmful_projection: float
    harmless_projection: float
    zero_at: float
    rejected: list[str] = field(default_factory=list)
    accuracy: float = math.nan

    @property
    def passed(self) -> bool:
        return not self.rejected

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class Selection:
    """The chosen (layer, position), every scored candidate, and how the choice was made."""

    layer: int
    position: int
    scores: list[CandidateScore]
    fallback: bool
    rule: str
    message: str
    baseline_harmful: float
    baseline_harmless: float
    refusal_token_ids: list[int]
    config: SelectionConfig

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "position": self.position,
            "fallback": self.fallback,
            "rule": self.rule,
            "message": self.message,
            "baseline_refusal_metric": {"harmful": self.baseline_harmful, "harmless": self.baseline_harmless},
            "refusal_token_ids": self.refusal_token_ids,
            "config": self.config.to_dict(),
            "candidates": [s.to_dict() for s in self.scores],
        }


# ------------------------------------------------------------------ forward helpers
def mean_metric(
    model: Any,
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
    model: Any,
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


def _rejections(
    bypass: float, induce: float, kl: float, layer: int, max_layer: float, config: SelectionConfig
) -> list[str]:
    """Why a scored candidate fails the selection filters (empty when it passes)."""
    reasons = []
    if not all(math.isfinite(v) for v in (bypass, induce, kl)):
        reasons.append("NaN score")
    if not induce > config.induce_threshold:
        reasons.append(f"induce {induce:.3g} <= {config.induce_threshold:g}")
    if not kl < config.kl_threshold:
        reasons.append(f"kl {kl:.3g} >= {config.kl_threshold:g}")
    if not layer < max_layer:
        reasons.append(f"layer {layer} >= {config.max_layer_fraction:g} L")
    return reasons


def _score(
    model: Any,
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
    reasons = _rejections(bypass, induce, kl, layer, max_layer, config)
    sep, val_accuracy = effect_size(val_h, val_b), accuracy(val_h, val_b, 0.5 * (hp + bp))
    return CandidateScore(
        layer, pos, bypass, induce, kl, sep, hp, bp, _zero_at(hp, bp), reasons, val_accuracy
    )


# ------------------------------------------------------------------ selection
def select_direction(
    model: Any,
    candidates: Candidates,
    val_harmful: PromptSet | Sequence[str],
    val_harmless: PromptSet | Sequence[str],
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


def _choose(
    scores: list[CandidateScore],
    config: SelectionConfig,
    max_layer: float,
    base_h: float,
    base_b: float,
    ids: list[int],
) -> Selection:
    passed = [s for s in scores if s.passed]
    refuses = base_h > 0 and base_h > base_b
    baseline_text = f"baseline refusal metric harmful {base_h:.2f} vs harmless {base_b:.2f}"
    if passed:
        best = min(passed, key=lambda s: (s.bypass, s.layer, -s.position))
        rule = f"argmin bypass ({config.ablation} ablation) s.t. induce > {config.induce_threshold:g}, kl < {config.kl_threshold:g}, layer < {config.max_layer_fraction:g} L"
        message = (
            f"selected layer {best.layer}, position {best.position}: bypass {best.bypass:.2f}, induce {best.induce:.2f}, "
            f"kl {best.kl:.3f} ({len(passed)}/{len(scores)} candidates passed; {baseline_text})"
        )
        fallback = False
    elif refuses and (beyond := [s for s in scores if _only_layer_bound(s)]):
        best = min(beyond, key=lambda s: (s.bypass, s.layer, -s.position))
        rule = (
            f"relaxed: argmin bypass among candidates failing ONLY layer < {config.max_layer_fraction:g} L "
            f"(induce > {config.induce_threshold:g}, kl < {config.kl_threshold:g} still hold)"
        )
        message = (
            f"no candidate below {config.max_layer_fraction:g} L passed, but {len(beyond)} beyond it pass every other "
            f"filter: refusal in this model is mediated late (e.g. a refusal fine-tune that only changed late "
            f"blocks); selected layer {best.layer}, position {best.position}: bypass {best.bypass:.2f}, "
            f"induce {best.induce:.2f}, kl {best.kl:.3f} ({baseline_text})"
        )
        fallback = True
        warnings.warn(message, NoRefusalWarning, stacklevel=3)
    else:
        pool = [s for s in scores if s.layer < max_layer and math.isfinite(s.separation)] or scores
        best = max(pool, key=_separation_key)
        rule = (
            "fallback: best held-out separation among layers < "
            f"{config.max_layer_fraction:g} L (validation accuracy at the training midpoint, "
            "then Cohen's d, then the earlier layer)"
        )
        if refuses:  # say which filters rejected everything
            kinds = Counter(reason.split(" ")[0] for score in scores for reason in score.rejected)
            why = ", ".join(f"{kind} {count}" for kind, count in kinds.most_common())
            diagnosis = (
                f"this model refuses, but every candidate failed a filter (rejections by filter: {why}); "
                "refusal may need an affine ablation (see the table)"
            )
        else:
            diagnosis = "this model barely refuses, so ablating or adding a direction cannot be scored against its refusals"
        message = (
            f"no candidate passed the selection filters ({len(scores)} scored; {baseline_text}): {diagnosis}; "
            f"falling back to the best held-out separation: layer {best.layer}, position {best.position} "
            f"(validation accuracy {best.accuracy:.3f}, Cohen's d {best.separation:.2f})"
        )
        fallback = True
        warnings.warn(message, NoRefusalWarning, stacklevel=3)
    return Selection(best.layer, best.position, scores, fallback, rule, message, base_h, base_b, ids, config)


def _separation_key(score: CandidateScore) -> tuple[float, float, int]:
    """Sort key of the fallback: validation accuracy, then Cohen's d, then the earlier layer."""

    def finite(value: float) -> float:
        return value if math.isfinite(value) else -math.inf

    return (finite(score.accuracy), finite(score.separation), -score.layer)


def _only_layer_bound(score: CandidateScore) -> bool:
    """True when the layer bound is the only filter this candidate failed."""
    return bool(score.rejected) and all(reason.startswith("layer ") for reason in score.rejected)
