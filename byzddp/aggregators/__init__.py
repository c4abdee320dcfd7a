"""Robust aggregation rules on an (m, d) tensor of vectors (one row per input).

`build(name, **params)` returns a callable rule: `agg(grads)` maps an (m, d) tensor on any
device to a (d,) tensor of the same dtype and device. Each rule class says what it needs of
(m, f') (`requirements`, `impossible`) and how the config's values become its parameters
(`resolve`); `byzddp.pipeline` builds and checks the rule of a config.

Rules (f = rows the rule must tolerate; every rule accepts f):
  mean                 the arithmetic mean; not robust: a non-finite row raises NonFiniteError.
  krum (f)             the row with the smallest score, score(i) = sum of the squared distances
                       to its m-f-2 nearest other rows (Blanchard et al. 2017).
  multikrum (f, m)     the mean of the m rows with the smallest Krum scores (default m = rows - f).
  cm                   coordinate-wise median; the mean of the two middle values for even m.
  trimmed_mean (b)     per coordinate drop the b largest and b smallest values, average the rest
                       (default b = f).
  rfa (T, nu)          geometric median by smoothed Weiszfeld: z = 0, then T times
                       beta_i = 1/max(||z - g_i||, nu), z = sum beta_i g_i / sum beta_i
                       (Pillutla et al. 2019). T = 1 is the normalized mean.
  cclip (tau, L)       centered clipping: L times c <- c + (1/m) sum_i clip_tau(g_i - c), with
                       clip_tau(v) = v min(1, tau/||v||); c starts from the previous call's output
                       (zero at first) and is the rule's state (Karimireddy et al. 2021).
  bulyan (f)           Krum selects theta = m-2f rows one at a time (each time Krum on the rows
                       left); per coordinate, the mean of the beta = theta-2f selected values
                       closest to their median (El Mhamdi et al. 2018).

Exact tie-breaking: Krum, Multi-Krum and Bulyan's selection take the lowest row index among
equal scores (stable sort); among values equally far from the median, Bulyan keeps the
smaller ones. A Krum round on r rows uses max(r-f-2, 1) neighbours: r-f-2 < 1 happens in
Bulyan's last round when f = 1 (and outside the theory). With one neighbour two mutual
nearest rows always tie, so Krum with r = f+3 and Bulyan with f <= 2 pick by input order
among them; otherwise the rules are invariant to the order of their inputs when no ties.

Non-finite rows (a Byzantine worker may send NaN or +-Inf): as long as at most f rows are bad,
no rule lets them reach its output. A bad row is infinitely far from every row in Krum,
Multi-Krum and Bulyan (never selected), counts as +Inf (NaN) or -Inf in the order statistics of
cm and trimmed_mean, and gets weight zero in rfa and a zero clipped step in cclip. A rule whose
output is still non-finite (more bad rows than it tolerates, or mean) raises NonFiniteError
instead of returning it.

Distances come from a float64 Gram matrix of the raw rows, never from `torch.cdist`'s
matrix-multiply shortcut: the rounding error of a squared distance is then about 1e-16 times
the squared norms of the two rows involved, so an outlier cannot spoil the distances between
other rows (as centring on a mean would). Krum, Multi-Krum and Bulyan read the data for that
one (m x d) x (d x m) product, then work on m x m numbers (Bulyan's theta Krum rounds too);
rfa and cclip run all their T or L iterations on that matrix too and read the data once more
for the result. No Python loop runs over rows, pairs or coordinates of the data.

Work over d follows a global grid of column chunks (`Columns`, `grid_width`: a function of d and
the device type only). The Gram matrix is the sum, in chunk order, of per-chunk products, and
every per-column computation runs on fresh buffers chunk by chunk or elementwise row by row, so
one rank's slice of the columns (`byzddp.sharded`) gives bit for bit the whole call's columns.
Memory stays O(m d + m^2).

`rule(grads)` raises NonFiniteError, which reads one flag back from the device;
`rule.aggregate(grads)` does not, and nothing else in a rule waits for the device, so the
training step can queue the aggregation and check the update lazily.
"""
from __future__ import annotations

import math
from typing import Optional

from byzddp.aggregators.base import Aggregator
from byzddp.aggregators.cclip import CenteredClipping
from byzddp.aggregators.coordinate import CoordinateMedian, Mean, TrimmedMean
from byzddp.aggregators.krum import Bulyan, Krum, MultiKrum
from byzddp.aggregators.rfa import RFA
from byzddp.errors import ConfigError, NonFiniteError
from byzddp.geometry import Columns, gram_matrix, grid_width, pairwise_squared_distances

__all__ = ["Aggregator", "Columns", "ConfigError", "NonFiniteError", "RULES", "PARAMS", "build",
           "rule_class", "param_problem", "gram_matrix", "grid_width", "pairwise_squared_distances"]

_CLASSES = {cls.name: cls for cls in (Mean, Krum, MultiKrum, CoordinateMedian, TrimmedMean, RFA,
                                       CenteredClipping, Bulyan)}
RULES = tuple(_CLASSES)
# Parameters each rule accepts besides f.
PARAMS = {name: cls.params for name, cls in _CLASSES.items()}


# ---------------------------------------------------------------------------- building

def param_problem(key: str, value) -> Optional[str]:
    """Why `value` is not valid for parameter `key`, or None."""
    if key in ("f", "m", "b", "T", "L"):
        low = 0 if key in ("f", "b") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            return f"must be an integer >= {low}"
    elif not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value < math.inf):
        return "must be a positive number"
    return None


def build(name: str, **params) -> Aggregator:
    """The rule `name` with its parameters (f for every rule; m, b, T, nu, tau, L where used;
    None means the default)."""
    if name not in _CLASSES:
        raise ConfigError(f"unknown aggregator '{name}'; choose one of {', '.join(RULES)}")
    allowed = ("f", *PARAMS[name])
    for key, value in params.items():
        if key not in allowed:
            raise ConfigError(f"aggregator {name} takes no parameter '{key}'; "
                              f"its parameters: {', '.join(allowed)}")
        problem = None if value is None else param_problem(key, value)
        if problem:
            raise ConfigError(f"aggregator {name}: parameter {key} {problem}, got {value!r}")
    return _CLASSES[name](**{k: v for k, v in params.items() if v is not None})


def rule_class(name: str) -> type:
    """The Aggregator class registered as `name`."""
    if name not in _CLASSES:
        raise ConfigError(f"unknown aggregator '{name}'; choose one of {', '.join(RULES)}")
    return _CLASSES[name]
