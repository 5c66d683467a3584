"""The statistics that confirm a winner: the paired ratio of means with Fieller's interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellsearch.stats import paired_ratio_interval


def test_known_input():
    # Hand-checked with Fieller's formula: means 1.15 / 1.016, t(0.975, 4) = 2.776.
    interval = paired_ratio_interval([1.1, 1.2, 1.15, 1.12, 1.18], [1.0, 1.05, 1.0, 1.01, 1.02])
    assert interval.estimate == pytest.approx(1.15 / 1.016)
    assert interval.low == pytest.approx(1.1003, abs=2e-3) and interval.high == pytest.approx(1.1631, abs=2e-3)
    assert interval.low > 1  # confirmed


def test_coverage_is_nominal_for_normal_pairs():
    """Over many simulated experiments (5 shared seeds, a true ratio of 1.05), the interval holds the true
    ratio about 95% of the time; pairing matters: the seed effect is large, the candidate's own noise small."""
    rng = np.random.default_rng(2026)
    trials = 1000
    hits = 0
    for _ in range(trials):
        reference = rng.normal(1.0, 0.1, 5)
        candidate = 1.05 * reference + rng.normal(0.0, 0.02, 5)
        interval = paired_ratio_interval(candidate, reference)
        hits += interval.low <= 1.05 <= interval.high
    assert 0.93 <= hits / trials <= 0.97


def test_pairing_confirms_what_independent_noise_would_hide():
    rng = np.random.default_rng(5)
    reference = rng.normal(1.0, 0.2, 6)  # seeds differ a lot
    candidate = reference * 1.03 + rng.normal(0.0, 0.002, 6)  # consistently 3% better on the same seed
    assert paired_ratio_interval(candidate, reference).low > 1
    assert paired_ratio_interval(candidate, rng.permutation(reference)).low < 1  # pairs broken: no confirmation


def test_degenerate_inputs():
    equal = paired_ratio_interval([0.5, 0.5], [0.5, 0.5])
    assert (equal.estimate, equal.low, equal.high) == (1.0, 1.0, 1.0)  # no noise: not above 1
    unbounded = paired_ratio_interval([0.1, 0.2, 0.15], [0.01, -0.02, 0.0])  # reference mean ~ 0
    assert unbounded.low == -math.inf and unbounded.high == math.inf
    single = paired_ratio_interval([1.2], [1.0])
    assert single.estimate == pytest.approx(1.2) and math.isnan(single.low)
    assert math.isnan(paired_ratio_interval([], []).estimate)
    assert math.isnan(paired_ratio_interval([1.0, math.nan], [1.0, 1.0]).estimate)
    with pytest.raises(ValueError, match="paired"):
        paired_ratio_interval([1.0, 2.0], [1.0])
