"""The library's one L2 logistic regression fit (probes, the learned judge, calibration maps).

``p(y = 1 | x) = sigmoid(w . x + b)`` fitted by scikit-learn's ``LogisticRegression`` (lbfgs,
``tol = 1e-8``) on features divided by ONE scalar, their mean Euclidean norm ``s``; the returned
weights are divided by ``s`` again, so they apply to the features as given (for activations: the
raw HF basis). The inverse L2 strength ``C`` is given, or chosen by deterministic stratified
k-fold cross-validation (:func:`~lens_safety.splits.stratified_folds`) over :data:`PROBE_C_GRID`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch

from lens_safety.splits import stratified_folds

#: Inverse L2 strengths ``C`` tried by the probe's cross-validation (features scaled to unit mean norm).
PROBE_C_GRID: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0)
#: Default probe regularisation: chosen per fit by deterministic k-fold CV on the training data.
#: Why not one constant: on SmolLM2's activations (n ~ 400 < d = 576) CV on the training split picks
#: C = 100-1000, while on small isotropic problems C = 1 recovers a planted direction better.
PROBE_REGULARIZATION: Literal["cv"] = "cv"


class LogisticFit(NamedTuple):
    """``p(positive | x) = sigmoid(weights . x + bias)`` (weights in the basis of the features given),
    the feature ``scale`` and the inverse L2 strength ``regularization`` used."""

    weights: np.ndarray
    bias: float
    scale: float
    regularization: float


def fit_logistic(
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    regularization: float | Literal["cv"] = PROBE_REGULARIZATION,
    folds: int = 5,
    grid: tuple[float, ...] = PROBE_C_GRID,
) -> LogisticFit:
    """Fit an L2 logistic regression (``positive`` = 1) on features divided by their mean norm.

    ``regularization="cv"``: each ``C`` of ``grid`` is scored by stratified ``folds``-fold
    cross-validation on these data (deterministic); the best mean accuracy wins, ties go to the
    smaller ``C`` (stronger regularisation); the final fit uses all data. With fewer than 2
    examples in a class, ``C = 1``.
    """
    from sklearn.linear_model import LogisticRegression

    features = torch.cat([positive, negative]).double().numpy()
    labels = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    scale = float(np.linalg.norm(features, axis=1).mean()) or 1.0
    features = features / scale

    def fitted(c: float, rows: np.ndarray | slice = slice(None)) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(features[rows], labels[rows])

    if regularization == "cv":
        k = min(folds, len(positive), len(negative))
        if k < 2:
            regularization = 1.0
        else:
            splits = stratified_folds(labels, k)
            scores = [
                np.mean([fitted(c, train).score(features[test], labels[test]) for train, test in splits])
                for c in grid
            ]
            regularization = grid[int(np.argmax(scores))]  # first maximum: smallest C
    model = fitted(float(regularization))
    return LogisticFit(model.coef_[0] / scale, float(model.intercept_[0]), scale, float(regularization))
