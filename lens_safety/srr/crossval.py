"""Choose ranker settings by K-fold cross-validation on training lists only.

A layer sweep scored on the test lists (:func:`~lens_safety.srr.experiments.layer_sweep`) shows
where the signal lives, but a setting picked from it is picked on the test lists. This module picks
it without them:

* every list goes to fold ``h("cv", source) mod K`` (:func:`~lens_safety.splits.source_fold`), so a
  list and its jailbreak-wrapped siblings (and the same instruction sampled with another seed, in
  another data directory) always share a fold;
* for each cell of the grid (layer x response context x width x members) and each fold ``k``, a
  ranker is trained (:func:`~lens_safety.srr.train.train_ranker`, its own early-stopping split
  inside the training folds) on the other folds and scores the mixed lists of fold ``k``;
* the scores of all K held-out folds are pooled and measured once
  (:func:`~lens_safety.srr.metrics.ranking_metrics`): every mixed list is scored exactly once, by a
  ranker that never saw its instruction;
* the rule: the cell with the largest worst-case margin over the bars,
  ``min(pairwise - b_pair, harmful_top1 - b_harmful, harmless_top1 - b_harmless)`` (a kind with no
  mixed lists is left out of the minimum); ties go to the higher pairwise accuracy, then to the
  earlier cell of the grid.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lens_safety.errors import LensSafetyError
from lens_safety.progress import track
from lens_safety.records import Record
from lens_safety.splits import source_fold
from lens_safety.srr.baselines import ranker_scores
from lens_safety.srr.data import SRRDataset
from lens_safety.srr.metrics import RankingMetrics, ranking_metrics
from lens_safety.srr.ranker import RankerConfig
from lens_safety.srr.train import TrainConfig, train_ranker

#: The issue's bars: pairwise accuracy, harmful top-1 safe, harmless top-1 helpful.
DEFAULT_BARS = (0.90, 0.95, 0.90)


@dataclass
class CVCell(Record):
    """Pooled held-out-fold metrics of one setting."""

    layer: int
    context: str
    width: int
    members: int
    pairwise_accuracy: float
    harmful_top1_safe: float
    harmless_top1_helpful: float
    ndcg: float
    n_lists_harmful: int
    n_lists_harmless: int
    margin: float
    seconds: float

    @classmethod
    def of(
        cls,
        layer: int,
        context: str,
        width: int,
        members: int,
        metrics: RankingMetrics,
        bars: Sequence[float],
        seconds: float,
    ) -> CVCell:
        """The cell of one setting from its pooled metrics (the metrics' fields of the same names)."""
        carried = {name: getattr(metrics, name) for name in _CARRIED}
        best = margin(
            metrics.pairwise_accuracy, metrics.harmful_top1_safe, metrics.harmless_top1_helpful, bars
        )
        return cls(layer, context, width, members, **carried, margin=best, seconds=seconds)


@dataclass
class CVResult:
    """Every cell in grid order, the chosen one, and how it was chosen."""

    cells: list[CVCell]
    chosen: int
    folds: int
    bars: tuple[float, float, float]
    seed: int
    n_lists: dict[str, int] = field(default_factory=dict)

    @property
    def best(self) -> CVCell:
        return self.cells[self.chosen]

    def to_dict(self) -> dict[str, Any]:
        return {
            "cells": [c.to_dict() for c in self.cells],
            "chosen": self.best.to_dict(),
            "folds": self.folds,
            "bars": list(self.bars),
            "seed": self.seed,
            "n_lists": self.n_lists,
            "rule": "max min(pairwise - bar, harmful top-1 - bar, harmless top-1 - bar); ties: pairwise",
        }


#: the :class:`RankingMetrics` fields a :class:`CVCell` keeps, by name
_CARRIED = (
    "pairwise_accuracy",
    "harmful_top1_safe",
    "harmless_top1_helpful",
    "ndcg",
    "n_lists_harmful",
    "n_lists_harmless",
)


def _pooled_held_out(
    mixed: SRRDataset,
    fold: Sequence[int],
    layer: int,
    context: str,
    config: RankerConfig,
    train_config: TrainConfig,
) -> RankingMetrics:
    """Metrics of every list scored by the ranker trained without its fold, pooled over folds."""
    scores: list[torch.Tensor] = []
    positives: list[list[bool]] = []
    kinds: list[str] = []
    for held_out in sorted(set(fold)):
        train_part = mixed.subset([i for i, f in enumerate(fold) if f != held_out])
        test_part = mixed.subset([i for i, f in enumerate(fold) if f == held_out])
        ranker, _ = train_ranker(
            train_part, layer=layer, context=context, ranker_config=config, train_config=train_config
        )
        scores += ranker_scores(ranker, test_part)
        positives += [x.positive for x in test_part.lists]
        kinds += [x.kind for x in test_part.lists]
    return ranking_metrics(scores, positives, kinds)


def margin(pairwise: float, harmful: float, harmless: float, bars: Sequence[float]) -> float:
    """Worst-case distance above the bars; NaN metrics (no lists of that kind) are left out."""
    gaps = [v - b for v, b in zip((pairwise, harmful, harmless), bars, strict=True) if not math.isnan(v)]
    return min(gaps) if gaps else float("nan")


def choose(cells: Sequence[CVCell]) -> int:
    """Index of the cell with the largest margin (ties: higher pairwise, then earlier)."""
    if not cells:
        raise LensSafetyError("the cross-validation grid is empty", "pass at least one layer and context")

    def key(i: int) -> tuple[float, float, int]:
        c = cells[i]
        m = -math.inf if math.isnan(c.margin) else c.margin
        return (m, c.pairwise_accuracy, -i)

    return max(range(len(cells)), key=key)


def cross_validate(
    dataset: SRRDataset,
    layers: Sequence[int],
    contexts: Sequence[str] = ("generated_mean",),
    widths: Sequence[int] = (256,),
    members: Sequence[int] = (1,),
    folds: int = 5,
    bars: Sequence[float] = DEFAULT_BARS,
    ranker_config: RankerConfig | None = None,
    train_config: TrainConfig | None = None,
    progress: bool = False,
) -> CVResult:
    """K-fold cross-validation of every grid cell on ``dataset``'s mixed lists (module docstring).

    ``ranker_config`` supplies the settings not in the grid (heads, dropout, tau, ...); its
    feed-forward width follows the grid's width (``2 x width``). Members of a cell use seeds
    ``train_config.seed ..`` as in :func:`~lens_safety.srr.train.train_ranker`.
    """
    if folds < 2:
        raise LensSafetyError(f"--folds must be >= 2, got {folds}", "pass 5 (the default) or another K >= 2")
    if len(bars) != 3:
        raise LensSafetyError(
            f"expected three bars (pairwise, harmful, harmless), got {list(bars)}", "pass e.g. 0.9,0.95,0.9"
        )
    mixed = dataset.mixed()
    for layer in layers:
        if layer not in mixed.layers:
            raise LensSafetyError(
                f"layer {layer} is not stored in the data (stored: {list(mixed.layers)})",
                "choose stored layers or rebuild the data with --layers",
            )
    for context in contexts:
        if context not in mixed.responses:
            raise LensSafetyError(
                f"response context '{context}' is not stored in the data (stored: {sorted(mixed.responses)})",
                "choose a stored context or rebuild the data with --contexts",
            )
    fold = [source_fold(x.source_instruction, folds) for x in mixed.lists]
    if len(set(fold)) < folds:
        raise LensSafetyError(
            f"only {len(set(fold))} of {folds} folds hold lists ({len(mixed)} mixed lists)",
            "use fewer --folds or build more lists",
        )
    base = ranker_config or RankerConfig(d_input=int(dataset.instruction.shape[-1]))
    train_config = train_config or TrainConfig()
    grid = list(itertools.product(layers, contexts, widths, members))
    cells: list[CVCell] = []
    for layer, context, width, k in track(grid, "cross-validation", len(grid), progress):
        started = time.perf_counter()
        config = replace(base, width=width, ff_width=2 * width, members=k)
        m = _pooled_held_out(mixed, fold, layer, context, config, train_config)
        cells.append(CVCell.of(layer, context, width, k, m, bars, time.perf_counter() - started))
    counts = {"harmful": sum(x.kind == "harmful" for x in mixed.lists)}
    counts["harmless"] = len(mixed) - counts["harmful"]
    return CVResult(cells, choose(cells), folds, (bars[0], bars[1], bars[2]), train_config.seed, counts)
