"""SRR experiments the paper did not report: layer sweep, response encoding, cross-category transfer.

* :func:`layer_sweep`: for every stored layer and each response context, train a ranker on
  ``train`` and measure it on ``test`` (same seed and settings everywhere);
* :func:`category_transfer`: train on the lists whose category is in ``train_categories`` and test
  on the lists of the other categories (harmless lists carry their paired harmful topic as
  category, so both kinds are split by topic; unpaired harmless lists, ``general`` /
  ``xstest_style``, go to the test side);
* :func:`sweep_figure`: a plotly figure of a sweep (pairwise accuracy and top-1 per layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lens_safety.progress import track
from lens_safety.records import Record
from lens_safety.splits import category_split
from lens_safety.srr.data import SRRDataset
from lens_safety.srr.evaluate import SRREvaluation, evaluate
from lens_safety.srr.features import CONTEXTS
from lens_safety.srr.ranker import RankerConfig
from lens_safety.srr.train import TrainConfig, train_ranker

if TYPE_CHECKING:  # plotly is optional: imported by the figures that need it
    import plotly.graph_objects as go


@dataclass
class SweepRow(Record):
    """Test metrics of a ranker trained at one layer with one response context."""

    layer: int
    context: str
    pairwise_accuracy: float
    harmful_top1_safe: float
    harmless_top1_helpful: float
    ndcg: float
    best_epoch: int


def layer_sweep(
    train: SRRDataset,
    test: SRRDataset,
    layers: Sequence[int] | None = None,
    contexts: Sequence[str] | None = None,
    ranker_config: RankerConfig | None = None,
    train_config: TrainConfig | None = None,
    progress: bool = False,
) -> list[SweepRow]:
    """Train and test one ranker per (layer, context); layers and contexts default to every one
    stored in both datasets."""
    chosen = list(layers) if layers is not None else [x for x in train.layers if x in test.layers]
    if contexts is None:
        contexts = [c for c in CONTEXTS if c in train.responses and c in test.responses]
    rows: list[SweepRow] = []
    grid = [(layer, context) for context in contexts for layer in chosen]
    for layer, context in track(grid, "layer sweep", len(grid), progress):
        ranker, report = train_ranker(
            train, layer=layer, context=context, ranker_config=ranker_config, train_config=train_config
        )
        m = evaluate(ranker, test).ranker
        rows.append(
            SweepRow(
                layer,
                context,
                m.pairwise_accuracy,
                m.harmful_top1_safe,
                m.harmless_top1_helpful,
                m.ndcg,
                report.best_epoch,
            )
        )
    return rows


def split_by_category(dataset: SRRDataset, train_categories: Sequence[str]) -> tuple[SRRDataset, SRRDataset]:
    """``(lists in train_categories, all other lists)``."""
    inside, outside = category_split([x.category for x in dataset.lists], train_categories)
    return dataset.subset(inside), dataset.subset(outside)


def category_transfer(
    dataset: SRRDataset,
    train_categories: Sequence[str],
    *,
    layer: int,
    context: str = "with_instruction",
    ranker_config: RankerConfig | None = None,
    train_config: TrainConfig | None = None,
) -> dict[str, Any]:
    """Train on some harm categories, test on the others; returns metrics of both sides."""
    train, test = split_by_category(dataset, train_categories)
    ranker, report = train_ranker(
        train, layer=layer, context=context, ranker_config=ranker_config, train_config=train_config
    )
    return {
        "train_categories": sorted(train_categories),
        "test_categories": sorted({str(x.category) for x in test.lists}),
        "train_counts": train.counts(),
        "test_counts": test.counts(),
        "in_distribution": evaluate(ranker, train).ranker.to_dict(),
        "transfer": evaluate(ranker, test).ranker.to_dict(),
        "best_epoch": report.best_epoch,
    }


def sweep_figure(rows: Sequence[SweepRow], title: str = "SRR layer sweep") -> go.Figure:
    """Plotly figure: pairwise accuracy and top-1 rates per layer, one line per context."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for context in sorted({r.context for r in rows}):
        mine = sorted((r for r in rows if r.context == context), key=lambda r: r.layer)
        for metric, dash in (
            ("pairwise_accuracy", "solid"),
            ("harmful_top1_safe", "dash"),
            ("harmless_top1_helpful", "dot"),
        ):
            figure.add_trace(
                go.Scatter(
                    x=[r.layer for r in mine],
                    y=[getattr(r, metric) for r in mine],
                    mode="lines+markers",
                    name=f"{metric} ({context})",
                    line={"dash": dash},
                )
            )
    figure.update_layout(
        title=title,
        xaxis_title="feature layer (resid_pre; last = final pre-norm)",
        yaxis_title="test score",
        yaxis_range=[0, 1.02],
    )
    return figure


def comparison_figure(
    evaluation: SRREvaluation | dict[str, Any], title: str = "SRR ranker vs baselines"
) -> go.Figure:
    """Plotly grouped bars: the ranker and every baseline on pairwise accuracy and the two top-1 rates.

    ``evaluation`` is an :class:`~lens_safety.srr.evaluate.SRREvaluation` or its ``to_dict()``.
    """
    import plotly.graph_objects as go

    summary = evaluation.to_dict() if isinstance(evaluation, SRREvaluation) else dict(evaluation)
    rows = {"SRR ranker": summary, **summary.get("baselines", {})}
    metrics = ("pairwise_accuracy", "harmful_top1_safe", "harmless_top1_helpful")
    figure = go.Figure()
    for name, values in rows.items():
        figure.add_trace(go.Bar(x=list(metrics), y=[values.get(m) for m in metrics], name=name))
    figure.update_layout(
        title=title, barmode="group", yaxis_title="score on mixed test lists", yaxis_range=[0, 1.02]
    )
    return figure
