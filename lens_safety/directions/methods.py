"""Extraction methods: plain functions from two activation matrices to one raw direction.

Every method has the signature of :class:`ExtractionMethod`: it takes the activations of the
harmful and of the harmless prompts at ONE (layer, position) — ``[n, d_model]`` in the raw HF
residual basis — and returns a raw ``[d_model]`` float64 vector in the same basis that points
from harmless toward harmful (toward refusal). Adding a method is adding one function to
:data:`METHODS`.

Scale convention: ``mean-diff`` returns ``r = mu_harmful - mu_harmless`` (its norm is the
distance between the class means). ``pca`` and ``probe`` find a unit direction ``u`` and return
``(u . r) u``, the part of the mean difference along ``u``, so every raw vector has a meaningful
norm for activation addition and the sign convention ``u . r > 0`` holds by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import torch
from jaxtyping import Float

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.logistic import (
    PROBE_C_GRID,
    PROBE_REGULARIZATION,
    LogisticFit,
    fit_logistic,
)

__all__ = [
    "METHODS",
    "PROBE_C_GRID",
    "PROBE_REGULARIZATION",
    "ExtractionMethod",
    "LogisticFit",
    "fit_logistic",
    "get_method",
    "logistic_probe",
    "mean_difference",
    "paired_differences",
    "pca_of_differences",
]


class ExtractionMethod(Protocol):
    """``(harmful [n_h, d], harmless [n_b, d], pairs) -> raw direction [d]`` (float64, raw HF basis)."""

    def __call__(
        self,
        harmful: Float[torch.Tensor, "n_harmful d_model"],
        harmless: Float[torch.Tensor, "n_harmless d_model"],
        pairs: Sequence[tuple[int, int]] | None = None,
    ) -> Float[torch.Tensor, " d_model"]: ...


def mean_difference(
    harmful: Float[torch.Tensor, "n_harmful d_model"],
    harmless: Float[torch.Tensor, "n_harmless d_model"],
    pairs: Sequence[tuple[int, int]] | None = None,
) -> Float[torch.Tensor, " d_model"]:
    """Difference in means ``mean_harmful x - mean_harmless x``, accumulated in float64."""
    return harmful.double().mean(0) - harmless.double().mean(0)


def _along_mean_difference(unit: torch.Tensor, harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """``(u . r) u`` with the sign of ``u`` flipped so that ``u . r >= 0``."""
    r = mean_difference(harmful, harmless)
    unit = unit.double() / unit.double().norm()
    scale = float(unit @ r)
    if scale < 0:
        unit, scale = -unit, -scale
    return scale * unit


def paired_differences(
    harmful: torch.Tensor, harmless: torch.Tensor, pairs: Sequence[tuple[int, int]] | None
) -> Float[torch.Tensor, "n_pairs d_model"]:
    """``x_harmful_i - x_harmless_j`` for each pair ``(i, j)``; by index when ``pairs`` is None."""
    if pairs is None:
        n = min(len(harmful), len(harmless))
        pairs = [(i, i) for i in range(n)]
    if len(pairs) < 1:
        raise LensSafetyError(
            "no harmful/harmless pairs to take differences of", "give both classes at least one prompt"
        )
    h_idx = torch.tensor([p[0] for p in pairs])
    b_idx = torch.tensor([p[1] for p in pairs])
    return harmful.double()[h_idx] - harmless.double()[b_idx]


def pca_of_differences(
    harmful: Float[torch.Tensor, "n_harmful d_model"],
    harmless: Float[torch.Tensor, "n_harmless d_model"],
    pairs: Sequence[tuple[int, int]] | None = None,
) -> Float[torch.Tensor, " d_model"]:
    """First principal axis of the paired differences ``D`` (uncentred: the top right singular
    vector of ``D``, the unit ``u`` maximising ``sum_i (u . d_i)^2``), returned as ``(u . r) u``.

    Pairs are topic pairs when the prompt sets carry pair ids, else prompts paired by index.
    """
    diffs = paired_differences(harmful, harmless, pairs)
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    return _along_mean_difference(vh[0], harmful, harmless)


def logistic_probe(
    harmful: Float[torch.Tensor, "n_harmful d_model"],
    harmless: Float[torch.Tensor, "n_harmless d_model"],
    pairs: Sequence[tuple[int, int]] | None = None,
    *,
    regularization: float | Literal["cv"] = PROBE_REGULARIZATION,
) -> Float[torch.Tensor, " d_model"]:
    """Weight vector of an L2-regularised logistic regression (harmful = 1), returned as ``(u . r) u``.

    Features are divided by one global scalar (the mean activation norm), never per coordinate,
    so the weight vector stays in the raw HF basis. ``regularization`` is sklearn's inverse
    strength ``C``, or ``"cv"`` to choose it by cross-validation (:func:`~lens_safety.evaluation.logistic.fit_logistic`).
    """
    weights = fit_logistic(harmful, harmless, regularization=regularization).weights
    return _along_mean_difference(torch.from_numpy(weights), harmful, harmless)


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "mean-diff": mean_difference,
    "pca": pca_of_differences,
    "probe": logistic_probe,
}


def get_method(name: str) -> Callable[..., torch.Tensor]:
    """The extraction function registered under ``name``."""
    if name not in METHODS:
        raise LensSafetyError(f"unknown extraction method '{name}'", f"use one of {', '.join(METHODS)}")
    return METHODS[name]
