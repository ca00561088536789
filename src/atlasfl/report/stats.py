"""Statistics across seeds: mean and SD, and paired comparisons of two methods (scipy).

The unit of replication is the seed: a run's clients share its data draw, its initialisation
and its server, so they are not independent samples, and the SD across a task's clients is a
different quantity (how far personalisation spreads the clients) reported on its own.
Comparisons pair runs of the same seed (same data, same initialisation): the differences
d_s = x_s - y_s give the mean difference, its 95% confidence interval from Student's t with
n - 1 degrees of freedom, the paired t-test, the Wilcoxon signed-rank test (exact for small
n) and Cohen's d_z = mean(d) / SD(d). With n = 1 there is no spread: only the difference.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Spread:
    """Mean and sample SD (n - 1) of values across seeds; SD is None for one value."""

    mean: float
    sd: float | None
    n: int


def spread(values: Sequence[float]) -> Spread:
    """Mean and SD across seeds of ``values`` (at least one)."""
    if not values:
        raise ValueError("spread of no values")
    if not all(math.isfinite(v) for v in values):  # shown as nan, never silently dropped
        return Spread(math.nan, None, len(values))
    sd = statistics.stdev(values) if len(values) > 1 else None
    return Spread(statistics.fmean(values), sd, len(values))


@dataclass(frozen=True)
class Paired:
    """One method against another over the seeds both have: differences x - y."""

    n: int
    mean_diff: float
    ci_low: float | None  # 95% t interval of the mean difference (n >= 2)
    ci_high: float | None
    t_p: float | None  # paired t-test, two-sided (n >= 2 and differences not all equal)
    wilcoxon_p: float | None  # signed-rank, two-sided (n >= 2 and some difference non-zero)
    cohens_d: float | None  # mean / SD of the differences (n >= 2, SD > 0)
    wins: int  # seeds where x > y


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles (``statistics.quantiles``, exclusive); under 4 values, min, max."""
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def paired(x: Mapping[int, float], y: Mapping[int, float]) -> Paired | None:
    """Paired comparison of ``x`` and ``y`` (seed -> value) over their common seeds.

    None when they share no seed.
    """
    seeds = sorted(set(x) & set(y))
    if not seeds:
        return None
    diffs = [x[s] - y[s] for s in seeds]
    n, mean = len(diffs), statistics.fmean(diffs)
    wins = sum(d > 0 for d in diffs)
    if n < 2:
        return Paired(n, mean, None, None, None, None, None, wins)
    sd = statistics.stdev(diffs)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    t_p = float(stats.ttest_rel(list(x[s] for s in seeds), list(y[s] for s in seeds)).pvalue
                ) if sd > 0 else None
    wilcoxon_p = (float(stats.wilcoxon(diffs).pvalue)
                  if any(d != 0 for d in diffs) else None)
    return Paired(n, mean, mean - half, mean + half, t_p, wilcoxon_p,
                  mean / sd if sd > 0 else None, wins)
