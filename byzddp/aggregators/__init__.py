"""Robust aggregation rules on an (m, d) tensor of vectors (one row per input).

`build(name, **params)` returns a callable rule: `agg(grads)` maps an (m, d) tensor on any
device to a (d,) tensor of the same dtype and device. `from_config(cfg)` builds the rule the
config asks for, told the number f' of Byzantine rows it must tolerate after pre-aggregation
(`byzddp.resampling`); `validate(cfg)` checks the rule's requirement on (m, f') first.

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
  meamed               per coordinate the mean of the m-f values closest to the median (Xie et
                       al. 2018); even m: the median is the mean of the two middle values.
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
import warnings
from typing import Optional

from byzddp.aggregators.base import Aggregator
from byzddp.aggregators.cclip import CenteredClipping
from byzddp.aggregators.coordinate import CoordinateMedian, MeanAroundMedian, Mean, TrimmedMean
from byzddp.aggregators.krum import Bulyan, Krum, MultiKrum
from byzddp.aggregators.rfa import RFA
from byzddp.errors import ConfigError, NonFiniteError
from byzddp.geometry import Columns, gram_matrix, grid_width, pairwise_squared_distances

__all__ = ["Aggregator", "Columns", "ConfigError", "NonFiniteError", "RULES", "PARAMS", "build",
           "from_config", "validate", "gram_matrix", "grid_width", "pairwise_squared_distances"]

_CLASSES = {cls.name: cls for cls in (Mean, Krum, MultiKrum, CoordinateMedian, TrimmedMean, RFA,
                                       CenteredClipping, Bulyan, MeanAroundMedian)}
# Rules that state their own defaults and requirements as classmethods (resolve, requirements,
# impossible, config_problem); the lead moves the older rules onto them.
_CLASS_VALIDATED = ("meamed",)
RULES = tuple(_CLASSES)
# Parameters each rule accepts besides f.
PARAMS = {name: cls.params for name, cls in _CLASSES.items()}


# ---------------------------------------------------------------------------- building

def _param_problem(key: str, value) -> Optional[str]:
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
        problem = None if value is None else _param_problem(key, value)
        if problem:
            raise ConfigError(f"aggregator {name}: parameter {key} {problem}, got {value!r}")
    return _CLASSES[name](**{k: v for k, v in params.items() if v is not None})


def _setting(cfg):
    """(resampler, m, f'): the vectors the rule sees after the config's pre-aggregation, and
    how many of them may be Byzantine."""
    from byzddp import resampling
    res = resampling.from_config(cfg)
    n, f = cfg.workers.n, cfg.workers.byzantine
    return res, res.num_outputs(n), res.byzantine_outputs(n, f)


def _rule_params(cfg, m: int, fp: int) -> dict:
    a = cfg.aggregator
    if a.name in _CLASS_VALIDATED:
        cls = _CLASSES[a.name]
        return cls.resolve({k: getattr(a, k) for k in cls.params}, m, fp)
    params = {"f": fp}
    if a.name == "multikrum":
        params["m"] = a.m if a.m is not None else max(m - fp, 1)
    elif a.name == "trimmed_mean":
        # Default b = f', kept computable (2b < m) when an expert runs outside the guarantee.
        params["b"] = a.b if a.b is not None else min(fp, (m - 1) // 2)
    elif a.name == "rfa":
        params.update(T=a.T, nu=a.nu)
    elif a.name == "cclip":
        params.update(tau=a.tau, L=a.L)
    return params


def from_config(cfg) -> Aggregator:
    """The rule of cfg.aggregator, told f' = the Byzantine rows it may see after cfg.resampling
    (defaults: multikrum m = m - f', trimmed_mean b = f')."""
    _, m, fp = _setting(cfg)
    return build(cfg.aggregator.name, **_rule_params(cfg, m, fp))


def _requirements(name: str, m: int, fp: int, params: dict) -> list:
    """(holds, condition, numbers, fix or None) for each guarantee the rule needs of (m, f')."""
    if name in ("krum", "multikrum"):
        reqs = [(2 * fp + 3 <= m, "2f'+3 <= m", f"2*{fp}+3={2 * fp + 3} > {m}", None)]
        if name == "multikrum":
            k = params["m"]
            reqs.append((k <= m - fp, "aggregator.m <= m-f'", f"aggregator.m={k} > {m}-{fp}",
                         f"lower aggregator.m to {max(m - fp, 1)}"))
        return reqs
    if name in ("cm", "rfa", "cclip"):
        return [(2 * fp + 1 <= m, "2f'+1 <= m (an honest majority)", f"2*{fp}+1={2 * fp + 1} > {m}", None)]
    if name == "trimmed_mean":
        b = params["b"]
        fix = f"raise aggregator.b to {fp}" if 2 * fp < m else None
        return [(b >= fp, "b >= f'", f"b={b} < {fp}", fix)]
    if name == "bulyan":
        return [(4 * fp + 3 <= m, "4f'+3 <= m", f"4*{fp}+3={4 * fp + 3} > {m}", None)]
    if name in _CLASS_VALIDATED:
        return _CLASSES[name].requirements(m, fp, params)
    return []  # mean promises nothing


def validate(cfg) -> None:
    """Check the rule's requirement on (m, f') after pre-aggregation; refuse (or, with
    aggregator.allow_unsafe, warn) with one line naming the rule, the numbers and the condition."""
    a = cfg.aggregator
    if a.name not in _CLASSES:
        raise ConfigError(f"config key aggregator.name: '{a.name}' is not one of {', '.join(RULES)}")
    for key in ("m", "b", "T", "nu", "tau", "L"):
        value = getattr(a, key)
        problem = None if value is None else _param_problem(key, value)
        if problem:
            raise ConfigError(f"config key aggregator.{key}: {problem}, got {value!r}")
    res, m, fp = _setting(cfg)
    params = _rule_params(cfg, m, fp)
    # Without these the rule cannot run at all: no flag lifts them.
    if a.name == "multikrum" and params["m"] > m:
        raise ConfigError(f"config key aggregator.m: multikrum averages m={params['m']} vectors but "
                          f"sees only {m}; lower aggregator.m")
    if a.name == "trimmed_mean" and 2 * params["b"] >= m:
        raise ConfigError(f"config key aggregator.b: trimmed_mean with b={params['b']} trims all of "
                          f"the {m} vectors it sees (needs 2b < m); lower aggregator.b")
    if a.name in _CLASS_VALIDATED:
        cls = _CLASSES[a.name]
        for problem in (cls.impossible(m, params), cls.config_problem(cfg)):
            if problem:
                raise ConfigError(f"config key {problem[0]}: {problem[1]}")
    if res.name in ("none", "nnm"):
        seen = "without resampling" if res.name == "none" else "after nnm"
        generic = "lower workers.byzantine or raise workers.n"
    else:
        seen = f"after resampling {res.name} (s={res.s})"
        generic = "lower workers.byzantine or resampling.s"
    for holds, condition, numbers, fix in _requirements(a.name, m, fp, params):
        if holds:
            continue
        msg = (f"aggregator {a.name} needs {condition}, but {seen} the rule sees m={m} vectors with "
               f"up to f'={fp} Byzantine ({numbers})")
        if a.allow_unsafe:
            warnings.warn(f"{msg}; running outside the rule's guarantee (aggregator.allow_unsafe=true)",
                          UserWarning, stacklevel=2)
        else:
            raise ConfigError(f"{msg}; {fix or generic}, or set aggregator.allow_unsafe=true")
