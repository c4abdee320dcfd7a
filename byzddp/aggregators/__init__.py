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
  meamed               per coordinate the mean of the m-f values closest to the median (Xie et
                       al. 2018); even m: the median is the mean of the two middle values.
  bulyan (f)           Krum selects theta = m-2f rows one at a time (each time Krum on the rows
                       left); per coordinate, the mean of the beta = theta-2f selected values
                       closest to their median (El Mhamdi et al. 2018).
  mda (f)              minimum diameter averaging: the mean of the m-f rows whose subset has the
                       smallest diameter (largest pairwise distance), exact over all C(m, m-f)
                       subsets (El Mhamdi et al. 2018); refused above subsets.MAX_SUBSETS subsets.
  smea (f)             smallest maximum eigenvalue averaging: the mean of the m-f rows whose
                       empirical covariance has the smallest largest eigenvalue, exact over all
                       subsets (Allouah et al. 2023); same limit.
  monna (f, designated)  the mean of the m-f rows nearest to the designated (honest) worker's row,
                       itself included (Farhadkhani et al. 2023); needs row i = worker i (no
                       pre-aggregation, nnm, arc or clipping).
  caf (f)              covariance-bound agnostic filter: weights 1, then while their sum > m-2f,
                       c_i *= 1 - tau_i/tau_max with tau_i the squared projection of x_i - mu on
                       the weighted covariance's top eigenvector; the weighted mean mu with the
                       smallest top eigenvalue seen (Allouah, Guerraoui and Stephan 2025).
  dnc (niters, b, c)   divide-and-conquer: niters times, on b random coordinates, score each row by
                       its squared projection on the top singular direction of the centred rows,
                       keep the m - floor(c f) lowest; the mean of the rows kept every time (if
                       none was, of those kept most often) (Shejwalkar & Houmansadr 2021).
  signguard (norm_low, norm_high, sign_fraction)
                       rows with norm in [norm_low, norm_high] x the median norm, intersected with
                       the largest mean-shift cluster of sign statistics (fractions of positive,
                       zero, negative entries on a random sign_fraction of the coordinates); their
                       mean, each clipped to the median norm (Xu et al. 2022).
  fltrust (root_size)  trust TS_i = ReLU(cos(g_i, g0)) with g0 the server's gradient on a trusted
                       root set of root_size training examples; sum TS_i g_i ||g0||/||g_i|| / sum
                       TS_i (Cao et al. 2021). A different threat model: the server holds clean data.

dnc and signguard take the step's random stream (`aggregate(grads, generator=g)`), fltrust the
root gradient (`aggregate(grads, root_gradient=g0)`); the trainer gives both (`draws`,
`trusted_root`).

Ties go to the lowest row index (docs/design.md, "Tie-breaking"). Up to f non-finite rows never
reach a robust rule's output; otherwise the rule raises NonFiniteError (docs/design.md,
"Non-finite rows"). Distances come from a float64 Gram matrix of the raw rows (docs/design.md,
"Distances from a float64 Gram matrix"), summed over a global grid of column chunks so that a
rank's slice gives bit for bit the whole call's columns (docs/design.md, "Exact sums over a
column grid"). Memory stays O(m d + m^2).

`rule(grads)` raises NonFiniteError, which reads one flag back from the device;
`rule.aggregate(grads)` does not, and nothing else in a rule waits for the device, so the
training step can queue the aggregation and check the update lazily.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from byzddp import plugins
from byzddp.aggregators.base import Aggregator
from byzddp.aggregators.cclip import CenteredClipping
from byzddp.aggregators.coordinate import CoordinateMedian, MeanAroundMedian, Mean, TrimmedMean
from byzddp.aggregators.filters import DivideAndConquer, FLTrust, SignGuard
from byzddp.aggregators.krum import Bulyan, Krum, MultiKrum
from byzddp.aggregators.rfa import RFA
from byzddp.aggregators.spectral import CovarianceAgnosticFilter
from byzddp.aggregators.subsets import MinimumDiameterAveraging, MoNNA, SmallestMaxEigenvalueAveraging
from byzddp.errors import ConfigError, NonFiniteError
from byzddp.geometry import Columns, gram_matrix, grid_width, pairwise_squared_distances

__all__ = ["Aggregator", "Columns", "ConfigError", "FunctionRule", "NonFiniteError", "RULES", "PARAMS", "build",
           "rule_class", "param_problem", "gram_matrix", "grid_width", "pairwise_squared_distances"]

_CLASSES = {cls.name: cls for cls in (Mean, Krum, MultiKrum, CoordinateMedian, TrimmedMean, RFA,
                                       CenteredClipping, Bulyan, MeanAroundMedian, DivideAndConquer,
                                       SignGuard, FLTrust, MinimumDiameterAveraging,
                                       SmallestMaxEigenvalueAveraging, MoNNA, CovarianceAgnosticFilter)}
RULES = tuple(_CLASSES)
# Parameters each rule accepts besides f.
PARAMS = {name: cls.params for name, cls in _CLASSES.items()}


# ---------------------------------------------------------------------------- building

def param_problem(key: str, value) -> Optional[str]:
    """Why `value` is not valid for parameter `key`, or None."""
    if key in ("f", "m", "b", "T", "L", "niters", "root_size", "designated"):
        low = 0 if key in ("f", "b", "designated") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            return f"must be an integer >= {low}"
    elif key == "sign_fraction" and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                     or not 0 < value <= 1):
        return "must be a fraction in (0, 1]"
    elif not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value < math.inf):
        return "must be a positive number"
    return None


def build(name: str, **params) -> Aggregator:
    """The rule `name` with its parameters (f for every rule; m, b, T, nu, tau, L, niters, c,
    norm_low, norm_high, sign_fraction, root_size, designated where used; None means the default)."""
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
    """The Aggregator class registered as `name`, or the plug-in an import path names."""
    if plugins.is_path(name):
        return plug_in(name)
    return plugins.resolve("aggregator.name", name)


# ---------------------------------------------------------------------------- plug-ins

class FunctionRule(Aggregator):
    """A plug-in rule given as a plain function `rule(grads) -> (d,) tensor` on the (m, d) rows:
    no f, no state, no random stream, the whole rows only (not train.exchange=sharded)."""
    function = None     # set on the subclass plug_in makes
    sharded = False
    keywords: dict = {}     # aggregator.args, passed to the function at every call

    def __init__(self, f: int = 0, **keywords) -> None:
        super().__init__(f)
        self.keywords = keywords

    @classmethod
    def probe(cls, m: int, keywords: dict) -> None:
        """One call on (m, 3) seeded rows before the run: a function that fails on them or does
        not return a (3,) tensor is one line naming the key, not an error inside the first step."""
        x = torch.randn(m, 3, generator=torch.Generator().manual_seed(0))
        try:
            out = cls.function(x, **keywords)
        except Exception as e:
            raise ConfigError(f"config key aggregator.name: '{cls.name}' fails on rows of shape ({m}, 3): "
                              f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}") from None
        if not isinstance(out, torch.Tensor) or out.shape != (3,):
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            raise ConfigError(f"config key aggregator.name: '{cls.name}' maps rows of shape ({m}, 3) to {got}; "
                              f"it must return a (3,) tensor, one value per column")

    def _aggregate(self, x, cols):
        out = type(self).function(x, **self.keywords)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape[1:]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"aggregator {self.name}: returned {shape}, expected a ({x.shape[1]},) tensor")
        return out.to(x.dtype)


def plug_in(name: str) -> type:
    """The Aggregator class of aggregator.name=package.module:rule: the class itself when it
    subclasses Aggregator, else a FunctionRule around the callable."""
    obj = plugins.resolve("aggregator.name", name)
    if isinstance(obj, type):
        return obj
    return type(f"FunctionRule[{name}]", (FunctionRule,), {"name": name, "function": staticmethod(obj)})


def _is_rule(obj) -> bool:
    return issubclass(obj, Aggregator) if isinstance(obj, type) else callable(obj)


plugins.register("aggregator.name", "rule", "rule", _CLASSES,
                 "a function (m, d) -> (d,) or a subclass of byzddp.aggregators.Aggregator", _is_rule,
                 "set aggregator.<param> instead")


def keyword_target(cls: type):
    """What aggregator.args go to: a function rule's function, else the class."""
    return cls.function if issubclass(cls, FunctionRule) else cls


def build_plug_in(cls: type, name: str, params: dict) -> Aggregator:
    """An instance of the plug-in rule class `cls` (from `plug_in`) with its resolved keywords."""
    try:
        rule = cls(**params)
    except TypeError as e:
        raise ConfigError(f"config key aggregator.args: the rule '{name}' does not take these keywords ({e}); "
                          f"it is called with f and aggregator.args") from None
    except ConfigError:
        raise
    except Exception as e:
        raise plugins.raised("aggregator.name", name, e, " when built with f and aggregator.args") from None
    if not rule.name:
        rule.name = name      # messages and logs name the rule by its path
    return rule
