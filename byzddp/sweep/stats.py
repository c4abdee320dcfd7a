"""Statistics over seeds: Student t quantiles, confidence intervals of a mean.

A cell's mean over k seeds gets the interval mean +- t_{(1+level)/2, k-1} s / sqrt(k), with s
the sample standard deviation (n - 1); a paired difference (arm - baseline, seed by seed) gets
the same interval over its k differences. The t quantile is computed here, exactly to double
precision, by inverting the t distribution function written through the regularized
incomplete beta function, so that the sweep needs no statistics package.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

LEVEL = 0.95


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), convergent for x < (a+1)/(a+b+2)."""
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        # Even step, then odd step, of the fraction's terms.
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def incomplete_beta(a: float, b: float, x: float, y: Optional[float] = None) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and x in [0, 1];
    `y` = 1 - x when the caller knows it more precisely than 1 - x rounds to."""
    y = 1.0 - x if y is None else y
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log(y))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    # The symmetry I_x(a, b) = 1 - I_y(b, a) keeps the fraction where it converges fast.
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, y) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    # x = df / (df + t^2) and its complement, each computed without cancellation.
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@functools.lru_cache(maxsize=1024)
def t_quantile(p: float, df: float) -> float:
    """The p quantile of Student's t with df > 0 degrees of freedom (bisection on t_cdf)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float], level: float = LEVEL) -> Tuple[float, Optional[float], Optional[float]]:
    """(mean, low, high): the Student t interval of the mean; (mean, None, None) for one value."""
    k = len(values)
    if k == 0:
        raise ValueError("no values")
    mean = sum(values) / k
    if k == 1:
        return mean, None, None
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
    half = t_quantile(0.5 + level / 2.0, k - 1) * s / math.sqrt(k)
    return mean, mean - half, mean + half
