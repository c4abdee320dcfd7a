"""Omniscient attacks: they learn the honest vectors through the Exchange (exact sums,
broadcasts, an all_gather) and forge from them."""
from __future__ import annotations

import math
import statistics
from typing import List, Optional

import torch

from byzddp import streams
from byzddp.attacks.base import (Attack, column_spans, copy_of, exact_sum, honest_mean, honest_rows,
                                 honest_std, require_positive)
from byzddp.errors import ConfigError


class IPM(Attack):
    """Inner product manipulation (Xie et al. 2020): send -epsilon * mean of honest vectors."""
    name = "ipm"
    params = positive = ("epsilon",)
    needs_gradient = False

    def __init__(self, epsilon: float = 0.1):
        self.epsilon = epsilon

    def forge(self, ctx):
        if ctx.byzantine:
            ctx.send(-self.epsilon * honest_mean(ctx))


class NormalizedMean(Attack):
    """The normalized-mean attack (section 3.2): send -sum over honest g_i / ||g_i||."""
    name = "nm"
    needs_gradient = False

    def forge(self, ctx):
        if not ctx.byzantine:
            return
        units = []
        for g in ctx.local_honest:
            g = g.to(torch.float64)
            norm = torch.linalg.vector_norm(g)
            units.append(torch.where(norm > 0, g / norm, torch.zeros_like(g)))
        ctx.send(-exact_sum(units, ctx.exchange, ctx.n, ctx.d, ctx.rows.device))


def alie_z(n: int, f: int) -> float:
    """A little is enough (Baruch et al. 2019): s = floor(n/2 + 1) - f supporters needed,
    z = Phi^-1((n - f - s) / (n - f)). n = 25, f = 5 gives 0.2533."""
    s = math.floor(n / 2 + 1) - f
    p = (n - f - s) / (n - f)
    if not 0.0 < p < 1.0:
        raise ConfigError(f"attack.name=alie: cannot derive z from n={n} and f={f} "
                          f"(Phi^-1 of {p:g}); give attack.z explicitly")
    return statistics.NormalDist().inv_cdf(p)


class ALIE(Attack):
    """Send mu - z * sigma, the coordinate-wise honest mean and sample std (official code:
    torch.std, denominator h - 1); z from n and the real f unless attack.z is given."""
    name = "alie"
    params = ("z",)
    needs_gradient = False
    min_honest = 2

    def __init__(self, z: Optional[float] = None):
        self.z = z

    @classmethod
    def check_values(cls, z=None, **_):
        if z is not None and not math.isfinite(z):
            raise ConfigError(f"config key attack.z: must be a finite number, got {z}")

    @classmethod
    def check(cls, n, f, f_key="attack.count", z=None, **params):
        super().check(n, f, f_key, z=z, **params)
        if z is None and f > 0:
            alie_z(n, f)

    def z_for(self, n: int, f: int) -> float:
        """The z sent against n workers of which f attack: attack.z, else from n and f."""
        return self.z if self.z is not None else (alie_z(n, f) if f else 0.0)

    def forge(self, ctx):
        if not ctx.byzantine:
            return
        z = self.z_for(ctx.n, len(ctx.byzantine))
        rows = honest_rows(ctx)
        out = torch.empty(ctx.d, dtype=ctx.rows.dtype, device=ctx.rows.device)
        for c in column_spans(ctx.exchange, ctx.d):
            extremes = rows.extremes(c)      # one read of the rows serves both sums
            mean = honest_mean(ctx, c, extremes)
            out[c] = mean - z * honest_std(ctx, mean, c, extremes)
        ctx.send(out)


class Mimic(Attack):
    """Copy one honest worker, chosen during a warm-up and then fixed (section 3.3).

    As the paper's official code: at step 0, z starts random (keyed by the seed) and takes one
    power-iteration step on the centred honest vectors; each later warm-up step averages in
    one more step (and the running mean). At every warm-up step the target is the honest
    worker with the largest inner product <g_i, z>, and the Byzantine workers already send its
    vector; after the warm-up (attack.warmup steps) the target stays fixed and only a
    broadcast of its vector is paid for.
    """
    name = "mimic"
    params = ("warmup",)
    needs_gradient = False
    fixed_set = True

    def __init__(self, warmup: int = 1):
        self.warmup = warmup
        self.target: Optional[int] = None
        self.mu: Optional[torch.Tensor] = None      # running mean and direction (warm-up only)
        self.z: Optional[torch.Tensor] = None

    def forge(self, ctx):
        if not ctx.byzantine:
            return
        if ctx.step < self.warmup:
            self._warmup(ctx)
        ctx.send(copy_of(ctx, self.target))

    @classmethod
    def check_values(cls, warmup=1, **_):
        if warmup < 1:
            raise ConfigError(f"config key attack.warmup: mimic needs at least 1 warm-up step, got {warmup}")

    def _warmup(self, ctx):
        t, device = ctx.step, ctx.rows.device
        honest = [g.to(torch.float64) for g in ctx.local_honest]
        mean = exact_sum(honest, ctx.exchange, ctx.n, ctx.d, device) / len(ctx.honest)
        if t == 0 or self.mu is None:
            t = 0
            self.mu = mean
            self.z = torch.randn(ctx.d, generator=streams.generator("mimic", ctx.seed),
                                 dtype=torch.float64).to(device)
        else:
            self.mu = t / (1 + t) * self.mu + mean / (1 + t)
        centred = [g - self.mu for g in honest]
        weighted = [torch.dot(c, self.z) * c for c in centred]
        cumu = exact_sum(weighted, ctx.exchange, ctx.n, ctx.d, device)
        norm = torch.linalg.vector_norm(cumu)
        step = torch.where(norm > 0, cumu / norm, self.z)   # identical honest vectors: keep z
        z = step if t == 0 else t / (1 + t) * self.z + step / (1 + t)
        self.z = z / torch.linalg.vector_norm(z)
        scores = torch.zeros(ctx.n, dtype=torch.float64, device=device)
        local = [w for w in ctx.workers if w not in ctx.byzantine]
        for w, g in zip(local, honest):
            scores[w] = torch.dot(g, self.z)
        ctx.exchange.all_reduce_sum(scores)         # one non-zero term per entry: exact
        scores[ctx.byzantine] = -math.inf
        self.target = int(scores.argmax())          # ties: the lowest worker id
        if ctx.step == self.warmup - 1:
            self.mu = self.z = None                 # fixed from now on

    def state_dict(self):
        return {"target": -1 if self.target is None else self.target, "mu": self.mu, "z": self.z}

    def load_state_dict(self, state):
        self.target = None if state["target"] < 0 else int(state["target"])
        self.mu, self.z = state["mu"], state["z"]


class Mimic2(Attack):
    """Section 3.3's mimic2: honest workers in two groups that share data within a group
    (data.partition=two_groups); every Byzantine worker copies group one (its first worker)."""
    name = "mimic2"
    needs_gradient = False
    min_honest = 2
    fixed_set = True
    partition = "two_groups"

    def forge(self, ctx):
        if ctx.byzantine:
            ctx.send(copy_of(ctx, ctx.honest[0]))


class MinMax(Attack):
    """Shejwalkar & Houmansadr (NDSS 2021), AGR-agnostic: m = mean + gamma * p with the
    largest gamma (binary search) such that max_i ||m - g_i|| <= max_ij ||g_i - g_j||.
    p = -std (default), -mean/||mean|| (unit) or -sign(mean) (sign)."""
    name = "minmax"
    params = ("perturbation", "gamma_init", "gamma_tol")
    needs_gradient = False
    min_honest = 2

    def __init__(self, perturbation: str = "std", gamma_init: float = 10.0, gamma_tol: float = 1e-5):
        self.perturbation_kind, self.gamma_init, self.gamma_tol = perturbation, gamma_init, gamma_tol

    @classmethod
    def check_values(cls, perturbation="std", gamma_init=10.0, gamma_tol=1e-5, **_):
        if perturbation not in ("std", "unit", "sign"):
            raise ConfigError(f"config key attack.perturbation: '{perturbation}' is not one of std, unit, sign")
        require_positive("gamma_init", gamma_init)
        if not 0 < gamma_tol < gamma_init:
            raise ConfigError(f"config key attack.gamma_tol: must be > 0 and below attack.gamma_init, "
                              f"got {gamma_tol}")

    def forge(self, ctx):
        if not ctx.byzantine:
            return
        everyone = ctx.exchange.all_gather(ctx.rows.contiguous())
        if not ctx.local_byzantine:
            return
        honest = torch.tensor(ctx.honest, device=everyone.device)
        ctx.send(self.malicious(everyone.index_select(0, honest).to(torch.float64)))

    def perturbation(self, g: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        kind = self.perturbation_kind
        if kind == "unit":
            return -mean / torch.linalg.vector_norm(mean)
        if kind == "sign":
            return -torch.sign(mean)
        return -g.std(0)

    def malicious(self, g: torch.Tensor) -> torch.Tensor:
        mean = g.mean(0)
        p = self.perturbation(g, mean)
        dev = g - mean                                          # (h, d)
        a = dev.square().sum(1)                                 # ||g_i - mean||^2
        b = dev @ p                                             # <g_i - mean, p>
        c = p.square().sum()
        pair = a[:, None] + a[None, :] - 2 * (dev @ dev.T)      # ||g_i - g_j||^2
        a, b, c, pair = a.tolist(), b.tolist(), float(c), pair.clamp(min=0)
        bound = self.bound(pair)

        def fits(gamma):    # ||m - g_i||^2 = a_i - 2 gamma b_i + gamma^2 c for m = mean + gamma p
            return self.spread([ai - 2 * gamma * bi + gamma * gamma * c for ai, bi in zip(a, b)]) <= bound
        return mean + search_gamma(fits, self.gamma_init, self.gamma_tol) * p

    @staticmethod
    def bound(pair: torch.Tensor) -> float:
        """The honest spread m must stay within, from the squared pairwise distances."""
        return float(pair.max())

    @staticmethod
    def spread(dist2: List[float]) -> float:
        """m's spread from its squared distances to the honest vectors."""
        return max(dist2)


class MinSum(MinMax):
    """As minmax, with sum_i ||m - g_i||^2 <= max_i sum_j ||g_i - g_j||^2."""
    name = "minsum"

    @staticmethod
    def bound(pair):
        return float(pair.sum(1).max())

    @staticmethod
    def spread(dist2):
        return sum(dist2)


def search_gamma(fits, init: float, tol: float) -> float:
    """The largest gamma in [0, 2*init) with fits(gamma), to within `tol`, by bisection (the
    feasible gammas form an interval that holds 0: the mean always fits)."""
    best, gamma, step = 0.0, init, init / 2
    while abs(best - gamma) > tol:
        if fits(gamma):
            best, gamma = gamma, gamma + step
        else:
            gamma -= step
        step /= 2
    return best
