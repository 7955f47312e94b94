"""Paired statistics against naive computations written here, and against scipy's own tests."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from leadkd.compare.stats import paired_interval, randomization_test
from leadkd.runtime.errors import LeadkdError

#: Student-t quantiles t_{0.975, df}, from tables.
T975 = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105}


def test_paired_interval_is_the_t_interval_of_the_differences():
    deltas = [0.012, 0.020, 0.031]
    mean = sum(deltas) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / 2)
    half = T975[2] * sd / math.sqrt(3)
    interval = paired_interval(deltas)
    assert interval.n == 3 and interval.mean == pytest.approx(mean, abs=1e-15)
    assert (interval.low, interval.high) == (pytest.approx(mean - half, abs=1e-9), pytest.approx(mean + half, abs=1e-9))
    assert not interval.excludes_zero  # a 0.02 gain whose seeds spread by 0.01 is not yet resolved by 3 seeds
    assert paired_interval([0.02, 0.021, 0.019]).excludes_zero


def test_paired_interval_agrees_with_scipys_paired_t_test():
    from scipy.stats import ttest_rel

    rng = np.random.default_rng(3)
    a, b = rng.normal(0.5, 0.02, 5), rng.normal(0.49, 0.02, 5)
    low, high = ttest_rel(a, b).confidence_interval(0.95)
    interval = paired_interval(a - b)
    assert (interval.low, interval.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))


def test_one_seed_has_no_interval_and_bad_inputs_are_refused():
    assert paired_interval([0.01]).low is None and not paired_interval([0.01]).excludes_zero
    with pytest.raises(LeadkdError, match="at least one"):
        paired_interval([])
    with pytest.raises(LeadkdError, match="confidence"):
        paired_interval([0.1, 0.2], confidence=1.0)
    with pytest.raises(LeadkdError, match="equal, non-empty"):
        randomization_test([1.0, 2.0], [1.0])


def naive_exact_p(a: list[float], b: list[float]) -> float:
    """Every assignment of the two labels within each pair, counted with Python loops."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    observed = abs(sum(d) / len(d))
    extreme = total = 0
    for signs in itertools.product((1, -1), repeat=len(d)):
        total += 1
        extreme += abs(sum(s * v for s, v in zip(signs, d, strict=True)) / len(d)) >= observed - 1e-12
    return extreme / total


def test_exact_randomization_test_matches_full_enumeration():
    a = [0.61, 0.40, 0.72, 0.33, 0.58, 0.90, 0.12]
    b = [0.55, 0.41, 0.60, 0.30, 0.58, 0.70, 0.10]
    assert randomization_test(a, b) == pytest.approx(naive_exact_p(a, b), abs=1e-15)
    assert randomization_test(a, a) == 1.0  # no difference at all


def test_sampled_randomization_test_agrees_with_scipy():
    from scipy.stats import permutation_test

    rng = np.random.default_rng(7)
    a = rng.uniform(0, 1, 60)
    b = np.clip(a - 0.03 + rng.normal(0, 0.12, 60), 0, 1)
    ours = randomization_test(a, b, resamples=40_000, seed=1)
    theirs = permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                              n_resamples=40_000, random_state=2).pvalue
    assert 0.0 < ours < 1.0
    assert ours == pytest.approx(theirs, abs=0.01)
    assert randomization_test(a, b, resamples=40_000, seed=1) == ours  # seeded: reproducible
