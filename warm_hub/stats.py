"""Intervals for the figures warm-hub reports: accuracies, paired differences, means over prompts or seeds.

Every claim about WARM (better than the ensemble, less memorization, a higher gold reward) is reported with its n
and a 95% interval from here, so that two numbers can be told apart from noise. Bootstrap resamples are seeded:
the same inputs give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_RESAMPLES = 2000


def wilson_interval(successes: int, n: int, *, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default): sound at 0, 1 and small n, unlike the normal one.

    Returns `(nan, nan)` when `n` is 0.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], *, z: float = Z_95) -> tuple[float, tuple[float, float]]:
    """Mean of `values` and its normal-approximation 95% interval (mean +- z * standard error)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return (math.nan, (math.nan, math.nan))
    mean = float(arr.mean())
    sem = standard_error(arr)
    return (mean, (mean - z * sem, mean + z * sem))


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)); 0 for a single value, nan for none."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return math.nan
    if arr.size == 1:
        return 0.0
    return float(arr.std(ddof=1) / math.sqrt(arr.size))


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, tuple[float, float]]:
    """Difference of means `mean(a) - mean(b)` over the same items, and its paired-bootstrap interval.

    `a[i]` and `b[i]` are two models' outcomes on item i (1/0 for a pair ranked right or wrong, or a gold reward):
    items are resampled together, so what the two share (an easy pair, a hard prompt) cancels out.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired outcomes must be two lists of one length, got {x.shape} and {y.shape}")
    if x.size == 0:
        return (math.nan, (math.nan, math.nan))
    diff = x - y
    rng = np.random.default_rng(seed)
    # Resample in blocks so memory stays small for large n.
    means = np.empty(resamples, dtype=np.float64)
    block = max(1, min(resamples, 2**22 // max(1, diff.size)))
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        idx = rng.integers(0, diff.size, size=(stop - start, diff.size))
        means[start:stop] = diff[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return (float(diff.mean()), (float(low), float(high)))
