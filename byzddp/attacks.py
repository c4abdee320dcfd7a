"""Byzantine behaviours. Byzantine workers forge on their own rank; the server never forges.

An attack sees the step through an AttackContext: the rows this rank is about to send (the
vectors honest workers would send, worker momentum included), which logical workers are
Byzantine at this step, and the Exchange through which an omniscient attack pays for what it
learns about honest workers. `forge` overwrites the local Byzantine rows in place. It is
called on every rank, because collectives need every rank, also those without attackers.

Who attacks: the last f logical workers, f = attack.count (default: the declared f,
workers.byzantine, which is what the rule is told), or with attack.rotate a fresh set every
step keyed by (seed, step).

What each attack pays for on the wire (d = model size; nothing at all when no worker attacks):
    none bitflip labelflip gaussian nan inf zero stale   no collective
    ipm, nm             one exact sum of d values over honest workers
    alie                two exact sums (the mean, then the squared deviations)
    mimic               warm-up steps: two exact sums and n scores; every step: one broadcast
                        of the target's vector from the rank hosting it
    mimic2              one broadcast of group one's vector
    minmax, minsum      one all_gather of every worker's vector (the whole honest set)

Exact sums, and why. A run must not depend on how workers map to ranks, but a float
all_reduce adds per-rank partial sums in an order that depends on the world size. `exact_sum`
writes each value as a 64-bit integer at a fixed-point scale chosen per coordinate (the power
of two that puts the coordinate's largest magnitude, agreed by a MAX all_reduce, just under
2**(62 - ceil(log2 n))), adds integers (associative: the same result for any rank count, and
no overflow for up to n terms), and scales back. A float32 value is kept exactly unless it is
more than 2**(38 - ceil(log2 n)) times smaller than its coordinate's largest, and then errs by
less than 2**(ceil(log2 n) - 61) of that largest value, far under float32 resolution; the sum
is rounded once to float64 at the end. Cost: an int32 MAX and an int64 SUM all_reduce, 12
bytes per coordinate instead of 4, still O(d); a float64 all_reduce would cost 8 and still
depend on the order when magnitudes in a coordinate are more than ~2**29 apart.
Per-row reductions (norms, inner products) run one row at a time so their kernels see the
same shapes whatever the rank count; attacks that hold the whole honest set (minmax, minsum)
compute on identical tensors everywhere.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Type

import torch

from byzddp import streams
from byzddp.config import ConfigError


@dataclass
class AttackContext:
    step: int
    seed: int
    rows: torch.Tensor          # (block, d): this rank's vectors, in the order of `workers`
    workers: range              # logical workers hosted here
    byzantine: List[int]        # logical ids of the Byzantine workers at this step
    exchange: object            # byzddp.exchange.Exchange
    n: int
    f_declared: int

    @property
    def local_byzantine(self) -> List[int]:
        """Row positions (into `rows`) of the Byzantine workers hosted here."""
        return [i for i, w in enumerate(self.workers) if w in self.byzantine]

    @property
    def honest_mask(self) -> torch.Tensor:
        """(block,) bool on the rows' device: which local rows are honest (padding is not)."""
        mask = torch.zeros(self.rows.shape[0], dtype=torch.bool)
        for i, w in enumerate(self.workers):
            mask[i] = w not in self.byzantine
        return mask.to(self.rows.device)

    @property
    def local_honest(self) -> List[torch.Tensor]:
        """The honest vectors hosted here, one (d,) view each, in worker order."""
        return [self.rows[i] for i, w in enumerate(self.workers) if w not in self.byzantine]

    @property
    def honest(self) -> List[int]:
        """Logical ids of every honest worker at this step."""
        return [w for w in range(self.n) if w not in self.byzantine]

    @property
    def d(self) -> int:
        return self.rows.shape[1]

    def send(self, vector: torch.Tensor) -> None:
        """Every local Byzantine worker sends `vector` (cast to the rows' dtype)."""
        for i in self.local_byzantine:
            self.rows[i].copy_(vector)


# ---------------------------------------------------------------------------- exact sums

EXP_FLOOR = -149            # float32's smallest subnormal is 2**-149: nothing below matters
EXP_NONFINITE = 2000        # above any finite float64 exponent: marks inf/nan coordinates


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e as float64, built from the exponent bits (exact; e within the normal range)."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def exact_sum(vectors: List[torch.Tensor], exchange, terms: int, d: int, device) -> torch.Tensor:
    """The sum over all ranks of every rank's `vectors`, as float64, bit-identical for any
    number of ranks. `terms` bounds how many vectors there are in all (sets the headroom).
    A coordinate where any input is inf or nan comes out nan. Collective."""
    headroom = max(1, math.ceil(math.log2(max(terms, 2))))
    largest = torch.zeros(d, dtype=torch.float64, device=device)
    for v in vectors:                                   # row by row: no (k, d) temporaries
        torch.maximum(largest, v.abs(), out=largest)    # nan and inf propagate
    top = torch.frexp(largest).exponent                 # largest < 2**top
    top = torch.where(largest > 0, top, torch.full_like(top, EXP_FLOOR)).clamp(min=EXP_FLOOR)
    top = torch.where(torch.isfinite(largest), top, torch.full_like(top, EXP_NONFINITE))
    exchange.all_reduce_max(top)
    bad = top >= EXP_NONFINITE
    shift = (62 - headroom) - top.clamp(max=1024).to(torch.int64)
    scale = _pow2(shift)
    total = torch.zeros(d, dtype=torch.int64, device=device)
    for v in vectors:       # |v * scale| < 2**(62 - headroom); truncation toward zero
        total += torch.nan_to_num(v * scale, nan=0.0, posinf=0.0, neginf=0.0).to(torch.int64)
    exchange.all_reduce_sum(total)
    out = total.to(torch.float64) * _pow2(-shift)
    return out.masked_fill(bad, float("nan"))


def honest_mean(ctx: AttackContext) -> torch.Tensor:
    """Mean of the honest vectors (float64, on every rank). Collective."""
    honest = ctx.local_honest
    return exact_sum(honest, ctx.exchange, ctx.n, ctx.d, ctx.rows.device) / len(ctx.honest)


def honest_std(ctx: AttackContext, mean: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise sample std (denominator h - 1, as torch.std) of the honest vectors."""
    squares = [torch.sub(g, mean).square_() for g in ctx.local_honest]     # float64
    total = exact_sum(squares, ctx.exchange, ctx.n, ctx.d, ctx.rows.device)
    return (total / (len(ctx.honest) - 1)).sqrt()


def copy_of(ctx: AttackContext, worker: int) -> torch.Tensor:
    """The vector `worker` is about to send, on every rank (a broadcast from its rank)."""
    if worker in ctx.workers:
        buf = ctx.rows[worker - ctx.workers.start].clone()
    else:
        buf = torch.empty(ctx.d, dtype=ctx.rows.dtype, device=ctx.rows.device)
    return ctx.exchange.broadcast_from_worker(worker, buf)


# ---------------------------------------------------------------------------- attacks

class Attack:
    name = "none"
    needs_gradient = True       # Byzantine workers first compute an honest-looking vector

    def __init__(self, cfg):
        self.cfg = cfg

    def labels(self, y: torch.Tensor, classes: int) -> torch.Tensor:
        """Labels a Byzantine worker trains on (honest ones always use the true labels)."""
        return y

    def forge(self, ctx: AttackContext) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class BitFlip(Attack):
    """Send -g: a sign-flipping fault of the sender's own gradient."""
    name = "bitflip"

    def forge(self, ctx):
        for i in ctx.local_byzantine:
            ctx.rows[i].neg_()


class LabelFlip(Attack):
    """Train on label C-1-y and send that honest-looking gradient."""
    name = "labelflip"

    def labels(self, y, classes):
        return classes - 1 - y


class Gaussian(Attack):
    """Send N(0, sigma^2 I), drawn from a stream keyed by (seed, worker, step)."""
    name = "gaussian"
    needs_gradient = False

    def forge(self, ctx):
        for i in ctx.local_byzantine:
            g = streams.generator("gaussian", ctx.seed, ctx.workers[i], ctx.step)
            noise = torch.randn(ctx.d, generator=g) * self.cfg.attack.sigma
            ctx.rows[i].copy_(noise)


class Fault(Attack):
    """A broken worker: sends a constant vector (NaN, +Inf, or zeros for a crashed one)."""
    needs_gradient = False
    value = 0.0

    def forge(self, ctx):
        for i in ctx.local_byzantine:
            ctx.rows[i].fill_(self.value)


class NaN(Fault):
    name, value = "nan", float("nan")


class Inf(Fault):
    name, value = "inf", float("inf")


class Zero(Fault):
    name, value = "zero", 0.0


class Stale(Attack):
    """Resend its own honest-looking vector of `attack.delay` steps ago (its oldest before then).

    Each Byzantine worker keeps the last delay+1 vectors it computed while Byzantine: with
    the default fixed set that is every step; with a rotating set, its last delay+1 Byzantine
    steps. The buffers live on the hosting ranks; a checkpoint gathers them to rank 0.
    """
    name = "stale"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.history: Dict[int, List[torch.Tensor]] = {}
        self.exchange = None
        self.trimmed = False

    def forge(self, ctx):
        self.exchange = ctx.exchange
        if not self.trimmed:    # after a resume every rank holds all buffers: keep its own
            self.history = {w: v for w, v in self.history.items() if w in ctx.workers}
            self.trimmed = True
        keep = self.cfg.attack.delay + 1
        for i in ctx.local_byzantine:
            past = self.history.setdefault(ctx.workers[i], [])
            past.append(ctx.rows[i].clone())
            del past[:-keep]
            ctx.rows[i].copy_(past[0])

    def state_dict(self):
        """Collective once the attack has run (every rank hands rank 0 its buffers)."""
        mine = {w: torch.stack(v).cpu() for w, v in self.history.items()}
        if self.exchange is None:
            return {"history": mine}
        parts = self.exchange.gather_object(mine)
        if parts is None:
            return {}
        return {"history": {w: v for part in parts for w, v in part.items()}}

    def load_state_dict(self, state):
        self.history = {int(w): list(v.clone().unbind(0)) for w, v in state.get("history", {}).items()}
        self.trimmed = False


class IPM(Attack):
    """Inner product manipulation (Xie et al. 2020): send -epsilon * mean of honest vectors."""
    name = "ipm"
    needs_gradient = False

    def forge(self, ctx):
        if ctx.byzantine:
            ctx.send(-self.cfg.attack.epsilon * honest_mean(ctx))


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
    needs_gradient = False

    def __init__(self, cfg):
        super().__init__(cfg)
        f = real_f(cfg)
        self.z = cfg.attack.z if cfg.attack.z is not None else (alie_z(cfg.workers.n, f) if f else 0.0)

    def forge(self, ctx):
        if not ctx.byzantine:
            return
        mean = honest_mean(ctx)
        ctx.send(mean - self.z * honest_std(ctx, mean))


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
    needs_gradient = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.target: Optional[int] = None
        self.mu: Optional[torch.Tensor] = None      # running mean and direction (warm-up only)
        self.z: Optional[torch.Tensor] = None

    def forge(self, ctx):
        if not ctx.byzantine:
            return
        if ctx.step < self.cfg.attack.warmup:
            self._warmup(ctx)
        ctx.send(copy_of(ctx, self.target))

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
        if ctx.step == self.cfg.attack.warmup - 1:
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

    def forge(self, ctx):
        if ctx.byzantine:
            ctx.send(copy_of(ctx, ctx.honest[0]))


class MinMax(Attack):
    """Shejwalkar & Houmansadr (NDSS 2021), AGR-agnostic: m = mean + gamma * p with the
    largest gamma (binary search) such that max_i ||m - g_i|| <= max_ij ||g_i - g_j||.
    p = -std (default), -mean/||mean|| (unit) or -sign(mean) (sign)."""
    name = "minmax"
    needs_gradient = False

    def forge(self, ctx):
        if not ctx.byzantine:
            return
        everyone = ctx.exchange.all_gather(ctx.rows.contiguous())
        if not ctx.local_byzantine:
            return
        honest = torch.tensor(ctx.honest, device=everyone.device)
        ctx.send(self.malicious(everyone.index_select(0, honest).to(torch.float64)))

    def perturbation(self, g: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        kind = self.cfg.attack.perturbation
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
        # ||m - g_i||^2 = a_i - 2 gamma b_i + gamma^2 c for m = mean + gamma p
        if self.name == "minmax":
            bound = float(pair.max())

            def fits(gamma):
                return max(ai - 2 * gamma * bi + gamma * gamma * c for ai, bi in zip(a, b)) <= bound
        else:
            bound = float(pair.sum(1).max())

            def fits(gamma):
                return sum(ai - 2 * gamma * bi + gamma * gamma * c for ai, bi in zip(a, b)) <= bound
        return mean + search_gamma(fits, self.cfg.attack.gamma_init, self.cfg.attack.gamma_tol) * p


class MinSum(MinMax):
    """As minmax, with sum_i ||m - g_i||^2 <= max_i sum_j ||g_i - g_j||^2."""
    name = "minsum"


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


ATTACKS: Dict[str, Type[Attack]] = {cls.name: cls for cls in (
    Attack, BitFlip, LabelFlip, Gaussian, NormalizedMean, Mimic, Mimic2, ALIE, IPM, MinMax, MinSum,
    NaN, Inf, Zero, Stale)}


def real_f(cfg) -> int:
    """How many workers actually attack: attack.count, default the declared f; none: 0."""
    if cfg.attack.name == "none":
        return 0
    return cfg.workers.byzantine if cfg.attack.count is None else cfg.attack.count


def byzantine_set(cfg, step: int) -> List[int]:
    """The Byzantine workers at `step`: the last f by default, or a fresh draw per step."""
    n, f = cfg.workers.n, real_f(cfg)
    if f == 0:
        return []
    if cfg.attack.rotate:
        perm = torch.randperm(n, generator=streams.generator("byzantine-set", cfg.seed, step))
        return sorted(perm[:f].tolist())
    return list(range(n - f, n))


def policy(cfg) -> str:
    return "rotating" if cfg.attack.rotate else "last_f"


def build(cfg) -> Attack:
    return ATTACKS[cfg.attack.name](cfg)


NEEDS_TWO_HONEST = ("alie", "minmax", "minsum", "mimic2")


def validate(cfg) -> None:
    a, n = cfg.attack, cfg.workers.n
    if a.name not in ATTACKS:
        raise ConfigError(f"config key attack.name: unknown attack '{a.name}'; choose one of "
                          f"{', '.join(sorted(ATTACKS))}")
    if a.count is not None and not 0 <= a.count < n:
        raise ConfigError(f"config key attack.count: {a.count} attackers out of workers.n={n}; "
                          f"it must be between 0 and n-1")
    f = real_f(cfg)
    count_key = "attack.count" if a.count is not None else "workers.byzantine"
    if a.name in NEEDS_TWO_HONEST and f > 0 and n - f < 2:
        raise ConfigError(f"config key {count_key}: attack {a.name} needs at least 2 honest workers, "
                          f"n - f = {n - f}; lower it or raise workers.n")
    # Parameters are checked whichever attack is chosen: a value that is never valid is a typo.
    if not a.sigma > 0:
        raise ConfigError(f"config key attack.sigma: must be > 0, got {a.sigma}")
    if not a.epsilon > 0:
        raise ConfigError(f"config key attack.epsilon: must be > 0, got {a.epsilon}")
    if a.name == "alie":
        if a.z is None and f > 0:
            alie_z(n, f)
        elif a.z is not None and not math.isfinite(a.z):
            raise ConfigError(f"config key attack.z: must be a finite number, got {a.z}")
    if a.name in ("mimic", "mimic2") and a.rotate:
        raise ConfigError(f"config key attack.rotate: {a.name} copies fixed honest workers; "
                          f"use attack.rotate=false with it")
    if a.warmup < 1:
        raise ConfigError(f"config key attack.warmup: mimic needs at least 1 warm-up step, got {a.warmup}")
    if a.name == "mimic2" and cfg.data.partition != "two_groups":
        raise ConfigError(f"config key data.partition: mimic2 needs honest workers in two groups "
                          f"sharing data; set data.partition=two_groups (got {cfg.data.partition})")
    if a.delay < 1:
        raise ConfigError(f"config key attack.delay: stale needs a delay of at least 1 step, got {a.delay}")
    if a.perturbation not in ("std", "unit", "sign"):
        raise ConfigError(f"config key attack.perturbation: '{a.perturbation}' is not one of std, unit, sign")
    if not a.gamma_init > 0:
        raise ConfigError(f"config key attack.gamma_init: must be > 0, got {a.gamma_init}")
    if not 0 < a.gamma_tol < a.gamma_init:
        raise ConfigError(f"config key attack.gamma_tol: must be > 0 and below attack.gamma_init, "
                          f"got {a.gamma_tol}")
