"""What every attack shares: the context it forges in, exact sums of honest vectors over the
Exchange, and the Attack base class (its parameters, their checks, state for checkpoints)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from byzddp import streams
from byzddp.errors import ConfigError


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
    # For attacks that model the server (Attack.needs_pipeline): the attacker's own copy of the
    # run's pipeline (pre-aggregation + rule), never the server's instance, so that evaluating
    # it does not move the server's state (cclip's centre).
    pipeline: Optional[object] = None
    # For attacks that learn from history (Attack.needs_previous): the update the server
    # broadcast at the previous step, identical on every rank; None before the first step.
    previous: Optional[torch.Tensor] = None
    # workers.participation < 1: the workers drawn this round (`byzantine` holds only drawn
    # ones, and n is their number); None: all n take part.
    participants: Optional[List[int]] = None

    def takes_part(self, worker: int) -> bool:
        return self.participants is None or worker in self.participants

    @property
    def local_byzantine(self) -> List[int]:
        """Row positions (into `rows`) of the Byzantine workers hosted here."""
        return [i for i, w in enumerate(self.workers) if w in self.byzantine]

    @property
    def honest_mask(self) -> torch.Tensor:
        """(block,) bool on the rows' device: which local rows are honest and take part (padding
        is not)."""
        mask = torch.zeros(self.rows.shape[0], dtype=torch.bool)
        for i, w in enumerate(self.workers):
            mask[i] = w not in self.byzantine and self.takes_part(w)
        return mask.to(self.rows.device)

    @property
    def local_honest(self) -> List[torch.Tensor]:
        """The honest vectors hosted here, one (d,) view each, in worker order."""
        return [self.rows[i] for i, w in enumerate(self.workers) if w not in self.byzantine and self.takes_part(w)]

    @property
    def honest(self) -> List[int]:
        """Logical ids of every honest worker taking part in this step."""
        everyone = range(self.n) if self.participants is None else self.participants
        return [w for w in everyone if w not in self.byzantine]

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


def pipeline_on(ctx: AttackContext, rows: torch.Tensor):
    """(aggregate, groups): the attacker's copy of the run's pipeline (ctx.pipeline) on all n
    rows, in worker order. The attacker does not know the server's random draw: the
    pre-aggregation draws from the attacker's own stream, keyed by (seed, step), the same for
    every call of a step. A stateful rule (cclip) starts from the state the server holds, which
    is the previous step's update (ctx.previous; none at the first step). A rule that draws
    (dnc, signguard) draws from the attacker's own stream too; fltrust's root gradient, computed
    on the server's private root set, is estimated by the honest mean."""
    p = ctx.pipeline
    if p is None:
        raise ValueError("this attack runs the server's pipeline: give AttackContext.pipeline "
                         "(the trainer does, for attacks with needs_pipeline)")
    if p.rule.stateful:
        p.rule.load_state_dict({} if ctx.previous is None else {"centre": ctx.previous})
    outputs, groups = p.pre(rows, streams.generator("attack-resampling", ctx.seed, ctx.step))
    inputs = {}
    if p.rule.draws:
        inputs["generator"] = streams.generator("attack-aggregator", ctx.seed, ctx.step)
    if p.rule.trusted_root:
        inputs["root_gradient"] = rows[ctx.honest].mean(dim=0)
    return p.rule.aggregate(outputs, **inputs), groups


def everyone(ctx: AttackContext) -> torch.Tensor:
    """Every worker's row (n, d), in worker order, on every rank: one all_gather (a copy, so the
    bits are the same on every rank). Collective."""
    return ctx.exchange.all_gather(ctx.rows.contiguous())


# ---------------------------------------------------------------------------- attacks

def require_positive(key: str, value) -> None:
    """One-line ConfigError naming attack.<key> unless value > 0."""
    if not value > 0:
        raise ConfigError(f"config key attack.{key}: must be > 0, got {value}")


class Attack:
    name = "none"
    params: tuple = ()          # the parameters the constructor takes (keywords, with defaults)
    needs_gradient = True       # Byzantine workers first compute an honest-looking vector
    min_honest = 0              # honest workers the attack needs to be defined at all
    fixed_set = False           # copies fixed honest workers: no rotating Byzantine set
    partition: Optional[str] = None     # the data.partition the attack needs, if any
    positive: tuple = ()        # parameters that must be > 0
    needs_pipeline = False      # gets its own copy of the run's pipeline in ctx.pipeline
    needs_previous = False      # gets the previous step's update in ctx.previous
    holds_data = False          # Byzantine workers hold a shard of the partition, as honest ones

    @classmethod
    def check_values(cls, **params) -> None:
        """One-line ConfigError for a parameter value that is never valid (checked whichever
        attack is chosen: such a value is a typo)."""
        for key in cls.positive:
            if key in params:
                require_positive(key, params[key])

    @classmethod
    def check(cls, n: int, f: int, f_key: str = "attack.count", **params) -> None:
        """One-line ConfigError for bad parameters or an (n, f) the attack cannot run on;
        f = the real number of attackers, f_key = the config key that set it."""
        cls.check_values(**params)
        if f > 0 and n - f < cls.min_honest:
            raise ConfigError(f"config key {f_key}: attack {cls.name} needs at least {cls.min_honest} "
                              f"honest workers, n - f = {n - f}; lower it or raise workers.n")

    @classmethod
    def check_rule(cls, rule: str, **params) -> None:
        """One-line ConfigError when the attack cannot run against aggregator.name=`rule`."""

    def prepare(self, train_x: torch.Tensor, classes: int) -> None:
        """Called once with the training images before the first step (the backdoor builds its
        trigger here); a ConfigError names what the data cannot give the attack."""

    def labels(self, y: torch.Tensor, classes: int) -> torch.Tensor:
        """Labels a Byzantine worker trains on (honest ones always use the true labels)."""
        return y

    def poison(self, x: torch.Tensor, y: torch.Tensor, classes: int):
        """The batch (x, y) a Byzantine worker trains on: by default its own, with `labels`."""
        return x, self.labels(y, classes)

    def forge(self, ctx: AttackContext) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
