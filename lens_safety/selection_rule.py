"""The selection rule: which scored (layer, position) candidate becomes the refusal direction.

Each candidate carries the scores of :func:`~lens_safety.selection.select_direction` (``bypass``,
``induce``, ``kl``, the validation separation and accuracy; see :mod:`lens_safety.selection`).
Filters: ``induce > induce_threshold``, ``kl < kl_threshold``, ``layer < max_layer_fraction * L``
and finite scores; a candidate's ``rejected`` lists the filters it fails. Rule, in order:

1. argmin ``bypass`` among the candidates passing every filter (ties: the earlier layer, then the
   later position);
2. for a model that refuses (baseline refusal metric on harmful prompts > 0 and above the
   harmless one): argmin ``bypass`` among the candidates failing ONLY the layer bound (refusal
   mediated late), a fallback that warns;
3. otherwise the best held-out separation among layers ``< max_layer_fraction * L``: validation
   accuracy at the midpoint of the training class-mean projections, then Cohen's d, then the
   earlier layer; a fallback that warns (:class:`NoRefusalWarning`) with a diagnosis.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lens_safety.records import Record


class NoRefusalWarning(UserWarning):
    """No candidate passed the selection filters; the fallback rule was used."""


@dataclass
class SelectionConfig(Record):
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
        out = super().to_dict()
        out["layers"] = None if self.layers is None else list(self.layers)
        out["positions"] = list(self.positions)
        out["refusal_tokens"] = None if self.refusal_tokens is None else list(self.refusal_tokens)
        return out


@dataclass
class CandidateScore(Record):
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
        return {**super().to_dict(), "passed": self.passed}


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
        plain = {name: getattr(self, name) for name in ("layer", "position", "fallback", "rule", "message")}
        return {
            **plain,
            "baseline_refusal_metric": {"harmful": self.baseline_harmful, "harmless": self.baseline_harmless},
            "refusal_token_ids": self.refusal_token_ids,
            "config": self.config.to_dict(),
            "candidates": [s.to_dict() for s in self.scores],
        }


def rejections(
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


def choose_selection(
    scores: list[CandidateScore],
    config: SelectionConfig,
    max_layer: float,
    base_h: float,
    base_b: float,
    ids: list[int],
) -> Selection:
    """Apply the rule (module docstring) to the scored candidates; the fallbacks warn."""
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
