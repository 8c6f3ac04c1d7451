"""Figures for notebooks, reports and the CLI: plotly per-layer plots and circuitsvis token views."""

from lens_safety.viz.calibration import calibration_figure
from lens_safety.viz.layers import (
    candidate_cosines,
    cosine_heatmap,
    direction_norms_figure,
    figure_html,
    mean_projections_figure,
    probe_accuracy_figure,
    probe_figures,
    projection_coordinates,
    projection_scatter,
    selection_scores_figure,
    separation_figure,
)
from lens_safety.viz.tokens import token_projection_view, token_projections

__all__ = [
    "calibration_figure",
    "candidate_cosines",
    "cosine_heatmap",
    "direction_norms_figure",
    "figure_html",
    "mean_projections_figure",
    "probe_accuracy_figure",
    "probe_figures",
    "projection_coordinates",
    "projection_scatter",
    "selection_scores_figure",
    "separation_figure",
    "token_projection_view",
    "token_projections",
]
