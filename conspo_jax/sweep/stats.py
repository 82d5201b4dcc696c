"""Confidence intervals over seeds: the mean, a two-sided Student-t interval and paired differences.

With n seeds the 95% interval is mean +- t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation
(ddof=1). One seed has no interval: its half-width is NaN and tables print it as "n/a".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats as _scipy_stats


class MeanCI(NamedTuple):
    """mean, half-width of the interval (NaN when n < 2), n, and the interval bounds."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": None if math.isnan(self.half_width) else self.half_width, "n": self.n}


def mean_ci(values: Sequence[float], *, confidence: float = 0.95) -> MeanCI:
    """Mean and Student-t confidence half-width of ``values`` (seeds); NaN values are an error."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return MeanCI(float("nan"), float("nan"), 0)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"mean_ci: values must be finite, got {x.tolist()}")
    if not 0 < confidence < 1:
        raise ValueError(f"mean_ci: confidence must be in (0, 1), got {confidence!r}")
    if x.size == 1:
        return MeanCI(float(x[0]), float("nan"), 1)
    t = float(_scipy_stats.t.ppf(0.5 + confidence / 2, df=x.size - 1))
    return MeanCI(float(x.mean()), t * float(x.std(ddof=1)) / math.sqrt(x.size), int(x.size))


def paired_difference(values: Mapping[int, float], baseline: Mapping[int, float], **kw) -> MeanCI:
    """Mean and CI over the seeds both have of values[seed] - baseline[seed] (paired by seed)."""
    seeds = sorted(set(values) & set(baseline))
    return mean_ci([values[s] - baseline[s] for s in seeds], **kw)


def score_standard_error(p: float, num_problems: int, samples: int = 1) -> tuple[float, float]:
    """Bounds on the standard error of one run's held-out score (mean of ``samples`` per problem).

    With per-problem success rates p_i of mean p, Var = (Var(p_i) + mean p_i(1 - p_i) / samples) / N.
    It is smallest, p(1-p) / (N samples), when every problem has p_i = p, and largest, p(1-p) / N, when
    each p_i is 0 or 1 (extra samples then add nothing). With one sample both bounds are sqrt(p(1-p) / N).
    """
    if not 0 <= p <= 1 or num_problems < 1 or samples < 1:
        raise ValueError(
            f"score_standard_error: need 0 <= p <= 1, N >= 1, samples >= 1; got {p}, {num_problems}, {samples}"
        )
    var = p * (1 - p)
    return math.sqrt(var / (num_problems * samples)), math.sqrt(var / num_problems)
