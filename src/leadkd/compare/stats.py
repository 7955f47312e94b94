"""Paired comparisons of two training recipes: the two numbers a result table needs to be believed.

Both compare a variant with a reference trained on the same seeds (same data order, same init):

* :func:`paired_interval` - the mean of the per-seed differences with a Student-t confidence interval.
  It answers "would another seed give the same sign?"; with 3 seeds its t factor is 4.30, so only a
  difference that is large against the seed-to-seed spread clears 0.
* :func:`randomization_test` - the paired (sign-flip) randomization test on per-query scores, as IR
  evaluation uses it (Smucker et al., CIKM 2007): under "no difference" each query's pair of scores is
  exchangeable, so flipping the sign of its difference is as likely as not. It answers "is the gap larger
  than the queries' noise?" for the scores given (e.g. each query's metric averaged over the seeds).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..runtime.errors import LeadkdError

__all__ = ["Interval", "paired_interval", "randomization_test"]

#: Up to this many queries the randomization test enumerates every sign pattern (2**n), exactly.
EXACT_UP_TO = 16


@dataclass(frozen=True)
class Interval:
    """Mean difference over ``n`` seeds and its two-sided confidence interval (None for n < 2)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def paired_interval(deltas: Sequence[float], confidence: float = 0.95) -> Interval:
    """``mean ± t_{(1+c)/2, n-1} · sd / sqrt(n)`` of per-seed differences (sample sd, n - 1 degrees)."""
    from scipy.stats import t

    values = np.asarray(list(deltas), dtype=np.float64)
    if values.size == 0:
        raise LeadkdError("a paired interval needs at least one difference")
    if not 0 < confidence < 1:
        raise LeadkdError(f"confidence must lie in (0, 1), got {confidence}")
    mean = float(values.mean())
    if values.size < 2:
        return Interval(mean, None, None, 1, confidence)
    half = float(t.ppf((1 + confidence) / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))
    return Interval(mean, mean - half, mean + half, int(values.size), confidence)


def randomization_test(a: Sequence[float], b: Sequence[float], resamples: int = 100_000, seed: int = 0) -> float:
    """Two-sided p-value of the paired randomization test of ``mean(a - b) == 0`` (a[i], b[i]: query i).

    With at most :data:`EXACT_UP_TO` queries every sign pattern is enumerated; otherwise ``resamples``
    random patterns are drawn from a seeded generator (so the p-value is reproducible) and the observed
    pattern is counted among them, ``p = (hits + 1) / (resamples + 1)``, which is never 0. A pattern
    counts as extreme when its |mean| reaches the observed one (up to float rounding).
    """
    x, y = np.asarray(list(a), dtype=np.float64), np.asarray(list(b), dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise LeadkdError(f"paired scores must be two equal, non-empty lists, got {x.size} and {y.size}")
    d = x - y
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))
    if d.size <= EXACT_UP_TO:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        return float(np.mean(np.abs(signs @ d) / d.size >= observed - tolerance))
    rng = np.random.default_rng(seed)
    hits, done, block = 0, 0, 8192
    while done < resamples:
        n = min(block, resamples - done)
        signs = rng.integers(0, 2, size=(n, d.size), dtype=np.int8) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ d) / d.size >= observed - tolerance))
        done += n
    return (hits + 1) / (resamples + 1)
