"""Confidence intervals: the percentile bootstrap (deterministic for a seed) and Wilson's interval.

Percentile bootstrap. For samples ``S_1..S_k`` (``k = 1`` for a mean; ``k = 2`` for a two-class
score such as an AUROC) and a statistic ``T``, draw ``B`` resamples; in resample ``b`` each sample
``S_j`` is redrawn, in the order ``j = 1..k``, as ``|S_j|`` indices with replacement (classes are
resampled separately, so each keeps its size). ``T`` is computed on each resample and the interval
is the ``(1-c)/2`` and ``(1+c)/2`` quantiles (linear interpolation, NaN resamples ignored).
:func:`bootstrap` is the case ``k = 1``, ``T`` = the mean, or the ratio ``sum w v / sum w`` when
``weights`` are given (token-weighted means); :func:`bootstrap_interval` takes any ``T``.
Everything is float64 numpy; the generator is ``numpy.random.default_rng(seed)`` and the indices
of one sample are drawn as one ``[B, n]`` block, which is the same stream as ``B`` draws of ``n``.

Wilson score interval (:func:`wilson_interval`) of a binomial proportion ``p = s / n`` with the
normal quantile ``z`` (1.96 for 95%): ``(p + z^2/2n ± z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``,
clipped to ``[0, 1]``; ``n = 0`` gives ``[0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lens_safety.records import Record

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95
#: the normal quantile of a two-sided 95% interval, as the Wilson interval uses it
Z_95 = 1.96


@dataclass(frozen=True)
class Estimate(Record):
    """A point estimate with a confidence interval."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    confidence: float = DEFAULT_CONFIDENCE

    @property
    def width(self) -> float:
        return self.ci_high - self.ci_low


def _quantiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.nanquantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def resample_indices(sizes: Sequence[int], n_resamples: int, seed: int) -> list[np.ndarray]:
    """``[n_resamples, sizes[j]]`` index matrices, one per sample, drawn as the module docstring says."""
    rng = np.random.default_rng(seed)
    if len(sizes) == 1:
        return [rng.integers(0, sizes[0], size=(n_resamples, sizes[0]))]
    rows: list[list[np.ndarray]] = [[] for _ in sizes]
    for _ in range(n_resamples):
        for j, n in enumerate(sizes):
            rows[j].append(rng.integers(0, n, n))
    return [np.stack(r) if r else np.empty((0, n), dtype=np.int64) for r, n in zip(rows, sizes, strict=True)]


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
    if n_resamples < 1:
        return Estimate(value, math.nan, math.nan, n, confidence)
    (index,) = resample_indices([n], n_resamples, seed)
    resampled_w = w[index]
    totals = resampled_w.sum(1)
    stats = np.where(
        totals > 0, (resampled_w * data[index]).sum(1) / np.where(totals > 0, totals, 1.0), np.nan
    )
    low, high = _quantiles(stats, confidence)
    return Estimate(value, low, high, n, confidence)


def bootstrap_interval(
    statistic: Callable[..., float],
    *samples: np.ndarray,
    n_resamples: int = 1000,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*samples)``, each sample resampled separately."""
    if n_resamples < 1 or not samples:
        return (math.nan, math.nan)
    arrays = [np.asarray(s) for s in samples]
    indices = resample_indices([len(a) for a in arrays], n_resamples, seed)
    stats = np.empty(n_resamples)
    for k in range(n_resamples):
        stats[k] = statistic(*(a[index[k]] for a, index in zip(arrays, indices, strict=True)))
    return _quantiles(stats, confidence)


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``successes / n`` (module docstring)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def wilson(outcomes: Sequence[bool] | Sequence[float], z: float = Z_95) -> Estimate:
    """Proportion of true ``outcomes`` with its Wilson interval (``confidence`` 0.95 for ``z = 1.96``)."""
    n = len(outcomes)
    successes = int(sum(bool(x) for x in outcomes))
    low, high = wilson_interval(successes, n, z)
    confidence = math.erf(z / math.sqrt(2.0))
    return Estimate(successes / n if n else math.nan, low, high, n, round(confidence, 4))
