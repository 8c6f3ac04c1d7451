"""Evaluate a ranker and every baseline on one dataset, in one run.

:func:`evaluate` scores the MIXED lists of a dataset (see :mod:`lens_safety.srr.metrics`) with the
ranker and with each baseline of :mod:`lens_safety.srr.baselines`, and returns an
:class:`SRREvaluation` whose ``to_dict()`` has the ranker's metrics at the top level
(``pairwise_accuracy``, ``harmful_top1_safe``, ``harmless_top1_helpful``, ``ndcg``,
``n_lists_harmful``, ``n_lists_harmless``, …) and a ``baselines`` object with the same keys per
baseline, plus the dataset's list counts (how many lists survived as mixed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lens_safety.srr.baselines import Baselines, ranker_scores
from lens_safety.srr.data import SRRDataset
from lens_safety.srr.metrics import RankingMetrics, ranking, ranking_metrics
from lens_safety.srr.ranker import SafetyRanker


@dataclass
class SRREvaluation:
    """Ranker metrics, baseline metrics and list counts of one evaluation."""

    ranker: RankingMetrics
    baselines: dict[str, RankingMetrics]
    counts: dict[str, int]
    ranker_config: dict[str, Any] = field(default_factory=dict)
    n_parameters: int = 0
    labels: list[dict[str, Any]] = field(default_factory=list)

    def beats(self, baseline: str, metric: str = "pairwise_accuracy") -> bool:
        """Whether the ranker is strictly better than ``baseline`` on ``metric``."""
        return getattr(self.ranker, metric) > getattr(self.baselines[baseline], metric)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.ranker.to_dict(),
            "baselines": {name: m.to_dict() for name, m in self.baselines.items()},
            "counts": self.counts,
            "ranker_config": self.ranker_config,
            "n_parameters": self.n_parameters,
            "labels": self.labels,
        }


def evaluate(
    ranker: SafetyRanker, dataset: SRRDataset, baselines: Baselines | None = None, seed: int = 0
) -> SRREvaluation:
    """Ranking metrics of ``ranker`` and of every baseline on the mixed lists of ``dataset``."""
    positives = [x.positive for x in dataset.lists]
    kinds = [x.kind for x in dataset.lists]
    main = ranking_metrics(ranker_scores(ranker, dataset), positives, kinds)
    others = {}
    if baselines is not None:
        for name, scores in baselines.scores(dataset, seed).items():
            others[name] = ranking_metrics(scores, positives, kinds)
    return SRREvaluation(
        main, others, dataset.counts(), ranker.config.to_dict(), ranker.n_parameters(), label_sources(dataset)
    )


def ranked_lists(ranker: SafetyRanker, dataset: SRRDataset) -> list[dict[str, Any]]:
    """Every list of ``dataset`` (mixed or not) with the ranker's score of each candidate and its
    choice, ``chosen`` (the index best-of-N returns; ties go to the earlier sample, as in
    :func:`~lens_safety.srr.metrics.ranking`): the per-prompt record behind the rates of
    :func:`evaluate`, for reading what the ranker picked."""
    out = []
    for item, scores in zip(dataset.lists, ranker_scores(ranker, dataset), strict=True):
        values = [float(x) for x in scores]
        out.append({**item.to_dict(), "scores": values, "chosen": ranking(scores)[0]})
    return out


def label_sources(dataset: SRRDataset) -> list[dict[str, Any]]:
    """Which judge labelled the candidates of which instruction sets: one entry per pooled part
    (``meta["parts"]``) or for the whole dataset, ``{"judge", "harmful", "harmless"}`` (set names)."""
    parts = dataset.meta.get("parts") or [dataset.meta]
    out = []
    for part in parts:
        prompts = part.get("prompts") or {}
        out.append(
            {
                "judge": (part.get("settings") or {}).get("judge"),
                **{kind: (prompts.get(kind) or {}).get("name") for kind in ("harmful", "harmless")},
            }
        )
    return out
