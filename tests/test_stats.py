"""Intervals: Wilson at the edges, paired bootstrap that sees what an unpaired one cannot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from warm_hub.stats import mean_interval, paired_bootstrap, standard_error, wilson_interval


def test_wilson_matches_known_values_and_edges():
    low, high = wilson_interval(81, 100)
    assert low == pytest.approx(0.7225, abs=1e-3) and high == pytest.approx(0.8750, abs=1e-3)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.2 < high < 0.35
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and 0.65 < low < 0.8
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_paired_bootstrap_is_seeded_and_paired():
    rng = np.random.default_rng(1)
    easy = rng.random(400) < 0.5  # shared difficulty: both models get the same pairs right...
    a = easy.astype(float)
    b = a.copy()
    b[:20] = 1 - b[:20]  # ...except 20 pairs where b flips
    diff, (low, high) = paired_bootstrap(a, b, seed=3)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert low <= diff <= high
    assert (low, high) == paired_bootstrap(a, b, seed=3)[1]
    # identical outcomes: a zero-width interval at 0
    assert paired_bootstrap(a, a)[1] == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_mean_interval_and_standard_error():
    mean, (low, high) = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and low < 2.5 < high
    assert standard_error([5.0]) == 0.0
    assert standard_error([1.0, 3.0]) == pytest.approx(1.0)
