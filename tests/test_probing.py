"""Layer-wise probing: scores against independent references, intervals, splits, cosine matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lens_safety import PromptSet
from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.bootstrap import bootstrap_interval
from lens_safety.evaluation.separation import auroc, projection_accuracy, validate_classes
from lens_safety.probing import probe_activations, probe_layers
from lens_safety.splits import split_heldout


def test_auroc_matches_sklearn_including_ties():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 4, 30).astype(float)
    labels = np.r_[np.ones(40), np.zeros(30)]
    assert auroc(pos, neg) == pytest.approx(roc_auc_score(labels, np.r_[pos, neg]))


def test_bootstrap_interval_is_deterministic_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1, 1, 50), rng.normal(0, 1, 50)
    low, high = bootstrap_interval(auroc, pos, neg, n_resamples=500, seed=3)
    assert low < auroc(pos, neg) < high
    assert (low, high) == bootstrap_interval(auroc, pos, neg, n_resamples=500, seed=3)
    wide = bootstrap_interval(auroc, pos[:8], neg[:8], n_resamples=500, seed=3)
    assert wide[1] - wide[0] > high - low  # fewer samples, wider interval


def synthetic(
    n: int, layers: int, d: int, signal: list[float], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    axis = torch.zeros(d)
    axis[0] = 1.0
    harmful = torch.randn(n, layers, d, generator=g)
    harmless = torch.randn(n, layers, d, generator=g)
    for k, s in enumerate(signal):
        harmful[:, k] += s * axis
    return harmful, harmless


def test_probe_activations_finds_signal_only_where_planted():
    signal = [0.0, 6.0, 6.0]
    train = synthetic(80, 3, 16, signal, seed=0)
    test = synthetic(60, 3, 16, signal, seed=1)
    report = probe_activations(*train, *test, layers=[0, 1, 2], n_bootstrap=200)
    by_layer = {r.layer: r for r in report.layers}
    assert by_layer[1].probe_accuracy > 0.95 and by_layer[1].mean_diff_accuracy > 0.95
    assert by_layer[1].mean_diff_auroc > 0.99
    assert 0.3 < by_layer[0].mean_diff_accuracy < 0.7 and 0.3 < by_layer[0].probe_auroc < 0.7
    lo, hi = by_layer[0].probe_accuracy_ci
    assert lo <= by_layer[0].probe_accuracy <= hi
    assert torch.allclose(report.cosine, report.cosine.T) and torch.allclose(
        report.cosine.diagonal(), torch.ones(3)
    )
    assert float(report.cosine[1, 2]) > 0.9 > abs(float(report.cosine[0, 1]))
    assert report.best_layer() in (1, 2)
    assert set(report.to_dict()["layers"][0]) >= {
        "probe_accuracy",
        "probe_auroc_ci",
        "mean_diff_accuracy",
        "effect_size",
    }


def test_projection_accuracy_uses_the_training_midpoint():
    direction = torch.tensor([1.0, 0.0])
    train_h, train_b = (
        torch.tensor([[4.0, 0.0], [6.0, 1.0]]),
        torch.tensor([[0.0, 0.0], [2.0, 5.0]]),
    )  # midpoint 3
    test_h, test_b = torch.tensor([[3.5, 0.0], [2.5, 0.0]]), torch.tensor([[2.9, 0.0], [3.1, 0.0]])
    assert projection_accuracy(direction, train_h, train_b, test_h, test_b) == pytest.approx(0.5)


def test_split_keeps_topic_pairs_together_and_is_disjoint():
    harmful, harmless = PromptSet.load("builtin:harmful"), PromptSet.load("builtin:harmless")
    (train_h, held_h), (train_b, held_b) = split_heldout(harmful), split_heldout(harmless)
    assert len(train_h) + len(held_h) == len(harmful) and set(train_h.prompts).isdisjoint(held_h.prompts)
    train_pairs = {p for p in train_h.pairs if p} | {p for p in train_b.pairs if p}
    held_pairs = {p for p in held_h.pairs if p} | {p for p in held_b.pairs if p}
    assert train_pairs.isdisjoint(held_pairs)
    plain = PromptSet.from_list([f"prompt {i}" for i in range(20)])
    train, held = split_heldout(plain, 0.25)
    assert (len(train), len(held)) == (15, 5)


def test_validate_classes_rejects_small_or_overlapping_sets():
    with pytest.raises(LensSafetyError, match="at least 2"):
        validate_classes(PromptSet.from_list(["a"]), PromptSet.from_list(["b", "c"]))
    with pytest.raises(LensSafetyError, match="appear in both"):
        validate_classes(PromptSet.from_list(["a", "b"]), PromptSet.from_list(["b", "c"]))


def test_probe_layers_on_smollm2(smollm2):
    def spread(p: PromptSet, n: int) -> PromptSet:
        return p.subset(list(range(0, len(p), len(p) // n))[:n])

    harmful, harmless = (
        spread(PromptSet.load("builtin:harmful"), 32),
        spread(PromptSet.load("builtin:harmless"), 32),
    )
    report = probe_layers(smollm2, harmful, harmless, layers=[2, 10, 18], n_bootstrap=200)
    assert [r.layer for r in report.layers] == [2, 10, 18]
    assert report.cosine.shape == (3, 3)
    best = max(report.layers, key=lambda r: r.mean_diff_accuracy)
    assert best.mean_diff_accuracy_ci[0] > 0.5  # separates above chance, with 95% confidence
    assert best.mean_diff_accuracy_ci[0] <= best.mean_diff_accuracy <= best.mean_diff_accuracy_ci[1]
    assert report.metadata["model"]["weights_sha256"] == smollm2.weights_hash
