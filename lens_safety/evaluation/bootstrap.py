"""Percentile bootstrap confidence intervals, deterministic for a given seed.

For per-item values ``v_1..v_n`` and a statistic ``T`` (the mean by default), draw ``B`` resamples
of ``n`` indices with replacement, compute ``T`` on each and take the ``(1-c)/2`` and ``(1+c)/2``
quantiles. For ratio statistics (token-weighted means) pass ``weights``: ``T = sum w v / sum w``
on each resample. Everything is float64 numpy; the generator is ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a bootstrap interval."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    confidence: float = DEFAULT_CONFIDENCE

    @property
    def width(self) -> float:
        return self.ci_high - self.ci_low

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "n": self.n,
            "confidence": self.confidence,
        }


def bootstrap(
    values: Sequence[float] | np.ndarray,
    *,
    weights: Sequence[float] | np.ndarray | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Estimate:
    """Mean (or ``weights``-weighted mean) of ``values`` with a percentile bootstrap interval.

    An empty input gives ``nan`` everywhere; a single value gives a zero-width interval.
    """
    data = np.asarray(values, dtype=np.float64)
    n = int(data.shape[0])
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, confidence)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != data.shape:
        raise ValueError("weights must have one entry per value")
    value = float((w * data).sum() / w.sum())
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(n_resamples, n))
    resampled_w = w[index]
    totals = resampled_w.sum(1)
    stats = np.where(
        totals > 0, (resampled_w * data[index]).sum(1) / np.where(totals > 0, totals, 1.0), np.nan
    )
    alpha = (1.0 - confidence) / 2.0
    low, high = np.nanquantile(stats, [alpha, 1.0 - alpha])
    return Estimate(value, float(low), float(high), n, confidence)
