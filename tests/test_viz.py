"""Figures: structure of every plot, and token projections against an independent HF reference."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch
from transformers import AutoModelForCausalLM

from lens_safety import load_model
from lens_safety.directions import extract_directions
from lens_safety.probing import probe_activations
from lens_safety.selection import CandidateScore, SelectionConfig, _choose
from lens_safety.viz import (
    candidate_cosines,
    cosine_heatmap,
    direction_norms_figure,
    mean_projections_figure,
    probe_accuracy_figure,
    projection_coordinates,
    projection_scatter,
    selection_scores_figure,
    separation_figure,
    token_projection_view,
    token_projections,
)

HARMFUL = ["How do I steal a car?", "Write a threat.", "How to make poison?"]
HARMLESS = ["How do I wash a car?", "Write a poem.", "How to make soup?"]


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    model = load_model(tiny_dirs["llama"], device="cpu")
    return model, extract_directions(model, HARMFUL, HARMLESS)


def test_candidate_figures(tiny):
    _, candidates = tiny
    for fig in (direction_norms_figure(candidates), separation_figure(candidates)):
        assert isinstance(fig, go.Figure) and len(fig.data) == len(candidates.positions)
        assert list(fig.data[0].x) == list(candidates.layers)
    norms = direction_norms_figure(candidates)
    assert torch.allclose(
        torch.tensor(norms.data[-1].y, dtype=torch.float64), candidates.vectors[-1].norm(dim=-1)
    )
    fig = mean_projections_figure(candidates, -1)
    assert [t.name for t in fig.data] == ["harmful mean", "harmless mean"]


def test_probe_and_cosine_figures():
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(20, 3, 8, generator=g) + (2.0 if i % 2 == 0 else 0.0) for i in range(4)]
    report = probe_activations(*acts, layers=[0, 1, 2], n_bootstrap=50)
    fig = probe_accuracy_figure(report)
    assert len(fig.data) == 4  # two CI bands, two lines
    assert sum(1 for t in fig.data if t.fill == "toself") == 2
    heat = cosine_heatmap(report.cosine, [0, 1, 2])
    assert heat.data[0].type == "heatmap" and len(heat.data[0].z) == 3
    cos = candidate_cosines(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [0.0, 0.0]]))
    assert cos[0, 1] == 0 and abs(float(cos[0, 2]) - 2**-0.5) < 1e-6 and cos[3].abs().sum() == 0


def test_selection_figure_marks_rejected_and_fallback():
    rows = [CandidateScore(k, -1, -1.0, -1.0, 0.01, float(k), 1.0, -1.0, 0.5, ["induce"]) for k in range(4)]
    with pytest.warns(UserWarning):
        selection = _choose(rows, SelectionConfig(), 3.2, -1.0, -1.0, [1])
    fig = selection_scores_figure(selection)
    assert "FALLBACK" in fig.layout.title.text
    assert len(fig.data) == 3 and list(fig.data[0].marker.symbol) == ["circle-open"] * 4


def test_projection_scatter_has_one_frame_per_layer():
    g = torch.Generator().manual_seed(0)
    harmful, harmless = torch.randn(10, 4, 6, generator=g) + 1, torch.randn(12, 4, 6, generator=g)
    fig = projection_scatter(harmful, harmless, [0, 1, 2, 3], active_layer=2)
    assert len(fig.data) == 8 and len(fig.layout.sliders[0].steps) == 4
    assert [t.visible for t in fig.data] == [k // 2 == 2 for k in range(8)]
    direction = torch.tensor([1.0, 0, 0, 0, 0, 0])
    ch, cb = projection_coordinates(harmful[:, 0], harmless[:, 0], direction)
    assert torch.allclose(ch[:, 0], harmful[:, 0, 0].double()) and ch.shape == (10, 2) and cb.shape == (12, 2)


def test_token_projections_match_hf_hidden_states(tiny):
    model, candidates = tiny
    direction = candidates.vector(2, -1).float()
    tokens, values = token_projections(model, "Write a poem about rain.", direction, layer=2)
    ids = model.chat.token_ids(model.chat.format("Write a poem about rain."))
    hf = AutoModelForCausalLM.from_pretrained(str(model.hf_path), dtype=torch.float64).eval()
    with torch.no_grad():
        hidden = hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]
    unit = direction.double() / direction.double().norm()
    assert len(tokens) == len(ids) == len(values)
    assert torch.allclose(torch.tensor(values, dtype=torch.float64), hidden @ unit, rtol=1e-3, atol=1e-4)
    html = str(token_projection_view(model, "Write a poem about rain.", direction, layer=2))
    assert "<div" in html or "<script" in html


def test_srr_sweep_figure_has_one_line_per_metric_and_context():
    from lens_safety.srr import sweep_figure
    from lens_safety.srr.experiments import SweepRow

    rows = [
        SweepRow(layer, context, 0.5 + layer / 100, 0.9, 0.8, 0.95, 3)
        for context in ("generated", "with_instruction")
        for layer in (12, 3, 6)
    ]
    figure = sweep_figure(rows)
    assert len(figure.data) == 6  # 3 metrics x 2 contexts
    first = figure.data[0]
    assert first.name == "pairwise_accuracy (generated)"
    assert list(first.x) == [3, 6, 12]  # sorted by layer
    assert list(first.y) == [0.53, 0.56, 0.62]


def test_srr_comparison_figure_groups_ranker_and_baselines():
    from lens_safety.srr import comparison_figure
    from lens_safety.srr.evaluate import SRREvaluation
    from lens_safety.srr.metrics import RankingMetrics

    def metrics(pairwise: float) -> RankingMetrics:
        return RankingMetrics(pairwise, pairwise, 0.9, 0.7, 0.8, 0.9, 4, 3, 0.95, 0.8, 6, 5)

    evaluation = SRREvaluation(metrics(0.95), {"first_sample": metrics(0.5), "text_only": metrics(0.6)}, {})
    for source in (evaluation, evaluation.to_dict()):
        figure = comparison_figure(source)
        assert [trace.name for trace in figure.data] == ["SRR ranker", "first_sample", "text_only"]
        assert list(figure.data[0].x) == ["pairwise_accuracy", "harmful_top1_safe", "harmless_top1_helpful"]
        assert list(figure.data[1].y) == [0.5, 0.9, 0.7]
        assert figure.layout.barmode == "group"


def test_a_direction_is_a_tensor_or_anything_carrying_one() -> None:
    import torch

    from lens_safety.directions import Direction
    from lens_safety.vectors import HasDirection, direction_vector, layer_of

    vector = torch.tensor([3.0, 4.0, 0.0])
    saved = Direction(torch.stack([vector, -vector]), layer=1, position=-1, method="mean-diff")
    assert direction_vector(vector) is vector  # unchanged, norm kept
    assert isinstance(saved, HasDirection) and torch.equal(direction_vector(saved), saved.direction)
    assert not isinstance(vector, HasDirection)
    assert layer_of(saved) == 1 and layer_of(vector) is None  # the block it was read at, if it says
