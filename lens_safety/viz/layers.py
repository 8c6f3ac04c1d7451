"""Per-layer plotly figures: direction norms, separation, mean projections, probe accuracy with
confidence bands, selection scores, a layer x layer cosine heatmap and a 2-D projection scatter
with a layer slider. Every function returns a ``plotly.graph_objects.Figure`` (nothing is shown or
written here). Inputs are lens-safety results; vectors are in the raw HF residual basis.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from lens_safety.directions import Candidates
    from lens_safety.probing import ProbeReport
    from lens_safety.selection import Selection

_HARMFUL, _HARMLESS = "#d62728", "#1f77b4"


def _figure(title: str, y_title: str) -> go.Figure:
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(
        title=title, xaxis_title="layer (resid_pre)", yaxis_title=y_title, template="plotly_white"
    )
    return fig


def _line(x: Sequence[int], y: Sequence[float], name: str, **style: Any) -> go.Scatter:
    """One ``lines+markers`` trace of a per-layer value (``style``: further Scatter properties)."""
    import plotly.graph_objects as go

    return go.Scatter(x=list(x), y=list(y), mode="lines+markers", name=name, **style)


def direction_norms_figure(candidates: Candidates) -> go.Figure:
    """``|r_i^(l)|`` against layer, one line per candidate position."""
    fig = _figure(f"Direction norm per layer ({candidates.method})", "norm of raw direction")
    norms = candidates.vectors.norm(dim=-1)
    for p, pos in enumerate(candidates.positions):
        fig.add_trace(_line(candidates.layers, norms[p].tolist(), f"position {pos}"))
    return fig


def separation_figure(candidates: Candidates) -> go.Figure:
    """Cohen's d of the training projections onto ``r_hat`` against layer, one line per position."""
    fig = _figure("Separation of harmful vs harmless along the direction", "effect size (Cohen's d)")
    for p, pos in enumerate(candidates.positions):
        fig.add_trace(_line(candidates.layers, candidates.effect_size[p].tolist(), f"position {pos}"))
    return fig


def mean_projections_figure(candidates: Candidates, position: int = -1) -> go.Figure:
    """Harmful and harmless mean projections onto ``r_hat`` per layer, with the line at 0.

    Plain ablation sets every projection to 0: where 0 lies beyond the harmful mean, ablation
    pushes harmless prompts toward refusal (affine ablation, which sets the projection to the
    harmless mean instead, does not).
    """
    import plotly.graph_objects as go

    p = candidates.positions.index(position)
    fig = _figure(f"Class-mean projections onto r_hat (position {position})", "projection")
    layers = list(candidates.layers)
    for means, name, colour in (
        (candidates.harmful_projection, "harmful mean", _HARMFUL),
        (candidates.harmless_projection, "harmless mean", _HARMLESS),
    ):
        fig.add_trace(go.Scatter(x=layers, y=means[p].tolist(), name=name, line={"color": colour}))
    fig.add_hline(y=0.0, line_dash="dot", annotation_text="plain ablation sets projections here")
    return fig


def _band(fig: go.Figure, x: list[int], low: list[float], high: list[float], colour: str, name: str) -> None:
    import plotly.graph_objects as go

    fig.add_trace(
        go.Scatter(
            x=x + x[::-1],
            y=high + low[::-1],
            fill="toself",
            fillcolor=colour,
            opacity=0.2,
            line={"width": 0},
            hoverinfo="skip",
            name=f"{name} 95% CI",
            showlegend=True,
        )
    )


def probe_accuracy_figure(report: ProbeReport, metric: str = "accuracy") -> go.Figure:
    """Held-out probe and mean-difference ``accuracy`` (or ``auroc``) per layer with bootstrap bands."""

    fig = _figure(f"Held-out {metric} per layer (position {report.position})", metric)
    layers = [r.layer for r in report.layers]
    for prefix, label, colour in (
        ("probe", "logistic probe", "#2ca02c"),
        ("mean_diff", "mean-diff projection", "#9467bd"),
    ):
        values = [getattr(r, f"{prefix}_{metric}") for r in report.layers]
        intervals = [getattr(r, f"{prefix}_{metric}_ci") for r in report.layers]
        _band(fig, layers, [c[0] for c in intervals], [c[1] for c in intervals], colour, label)
        fig.add_trace(_line(layers, values, label, line={"color": colour}))
    fig.update_yaxes(range=[0.0, 1.02])
    return fig


def probe_figures(report: ProbeReport) -> dict[str, go.Figure]:
    """The per-layer figures of a probe report by file stem: held-out accuracy and AUROC of the
    probe and of the mean-difference projection, and the layer x layer cosine of the
    mean-difference directions."""
    return {
        "probe_accuracy": probe_accuracy_figure(report, "accuracy"),
        "probe_auroc": probe_accuracy_figure(report, "auroc"),
        "cosine": cosine_heatmap(
            report.cosine,
            title=f"Cosine of mean-difference directions across layers (position {report.position})",
        ),
    }


def selection_scores_figure(selection: Selection) -> go.Figure:
    """Bypass, induce and KL per scored layer (one line per position); rejected points are hollow."""
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        subplot_titles=("bypass (lower is better)", "induce (> 0 required)", "KL (< threshold required)"),
    )
    for pos in sorted({s.position for s in selection.scores}):
        rows = [s for s in selection.scores if s.position == pos]
        for i, key in enumerate(("bypass", "induce", "kl"), start=1):
            symbols = ["circle" if s.passed else "circle-open" for s in rows]
            trace = _line(
                [s.layer for s in rows],
                [getattr(s, key) for s in rows],
                f"{key} @ {pos}",
                marker={"symbol": symbols, "size": 8},
                text=["passed" if s.passed else "; ".join(s.rejected) for s in rows],
            )
            fig.add_trace(trace, row=i, col=1)
    fig.add_hline(y=selection.config.kl_threshold, line_dash="dot", row=3, col=1)
    fig.add_hline(y=selection.config.induce_threshold, line_dash="dot", row=2, col=1)
    fig.add_vline(x=selection.layer, line_dash="dash", line_color="black")
    title = "Selection scores" + (
        " — FALLBACK (no candidate passed)" if selection.fallback else f" — selected layer {selection.layer}"
    )
    fig.update_layout(title=title, template="plotly_white", height=750)
    fig.update_xaxes(title_text="layer", row=3, col=1)
    return fig


def cosine_heatmap(
    cosine: Float[torch.Tensor, "n_layers n_layers"],
    layers: Sequence[int] | None = None,
    title: str = "Cosine similarity of directions across layers",
) -> go.Figure:
    """Layer x layer heatmap of cosine similarities (e.g. :attr:`ProbeReport.cosine`)."""
    import plotly.graph_objects as go

    labels = list(layers) if layers is not None else list(range(cosine.shape[0]))
    fig = go.Figure(
        go.Heatmap(
            z=cosine.tolist(), x=labels, y=labels, zmin=-1, zmax=1, colorscale="RdBu", reversescale=True
        )
    )
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="layer", template="plotly_white")
    return fig


def candidate_cosines(
    directions: Float[torch.Tensor, "n_layers d_model"],
) -> Float[torch.Tensor, "n_layers n_layers"]:
    """Cosine similarity of every pair of rows (zero rows give 0)."""
    rows = directions.double()
    units = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return (units @ units.T).float()


def projection_coordinates(
    harmful: Float[torch.Tensor, "n_h d_model"],
    harmless: Float[torch.Tensor, "n_b d_model"],
    direction: Float[torch.Tensor, " d_model"],
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D coordinates ``(r_hat . x, v . x)``: ``v`` is the top principal axis of the pooled
    activations after removing their ``r_hat`` component (so the axes are orthogonal)."""
    unit = direction.double() / direction.double().norm().clamp_min(1e-30)
    pooled = torch.cat([harmful, harmless]).double()
    residual = pooled - (pooled @ unit)[:, None] * unit
    _, _, vh = torch.linalg.svd(residual - residual.mean(0), full_matrices=False)
    second = vh[0]
    coords = torch.stack([pooled @ unit, pooled @ second], dim=1)
    return coords[: len(harmful)], coords[len(harmful) :]


def projection_scatter(
    harmful: Float[torch.Tensor, "n_h n_layers d_model"],
    harmless: Float[torch.Tensor, "n_b n_layers d_model"],
    layers: Sequence[int],
    directions: Float[torch.Tensor, "n_layers d_model"] | None = None,
    active_layer: int | None = None,
) -> go.Figure:
    """Harmful vs harmless scatter in the plane (direction, top orthogonal PC), one frame per layer,
    chosen with a slider. ``directions`` defaults to each layer's difference in means."""
    import plotly.graph_objects as go

    fig = go.Figure()
    layers = list(layers)
    active = layers.index(active_layer) if active_layer in layers else len(layers) // 2
    for k, _ in enumerate(layers):
        h, b = harmful[:, k].double(), harmless[:, k].double()
        vec = directions[k] if directions is not None else h.mean(0) - b.mean(0)
        ch, cb = projection_coordinates(h, b, vec)
        for coords, name, colour in ((ch, "harmful", _HARMFUL), (cb, "harmless", _HARMLESS)):
            fig.add_trace(
                go.Scatter(
                    x=coords[:, 0].tolist(),
                    y=coords[:, 1].tolist(),
                    mode="markers",
                    name=name,
                    marker={"color": colour, "opacity": 0.7},
                    visible=k == active,
                )
            )
    steps = []
    for k, layer in enumerate(layers):
        visible = [j // 2 == k for j in range(2 * len(layers))]
        steps.append(
            {
                "method": "update",
                "label": str(layer),
                "args": [
                    {"visible": visible},
                    {"title": f"Layer {layer}: projection onto the direction vs top orthogonal PC"},
                ],
            }
        )
    fig.update_layout(
        title=f"Layer {layers[active]}: projection onto the direction vs top orthogonal PC",
        sliders=[{"active": active, "currentvalue": {"prefix": "layer "}, "steps": steps}],
        xaxis_title="projection onto r_hat",
        yaxis_title="top orthogonal principal component",
        template="plotly_white",
    )
    return fig


def figure_html(fig: go.Figure, path: str | os.PathLike[str], *, embed_plotlyjs: bool = True) -> None:
    """Write a figure as standalone HTML (plotly.js embedded, so it opens offline)."""
    fig.write_html(str(path), include_plotlyjs=True if embed_plotlyjs else "cdn", full_html=True)
