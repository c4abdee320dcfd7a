"""What every attack shares: the context it forges in, exact sums of honest vectors over the
Exchange, and the Attack base class (its parameters, their checks, state for checkpoints)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

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
INTEGER_BITS = 52           # a float64 holds every integer below 2**53 exactly
EXACT_BLOCK_BYTES = 1 << 20  # one block of float64 scratch (k vectors x columns), inside L2
SPAN = 1 << 16              # columns an attack computes on at a time in one process


def column_spans(exchange, d: int) -> List[slice]:
    """The column ranges an attack computes on in turn. Across ranks, all d at once, so that
    each collective runs once. In one process the collectives are the identity and every step
    is per column, so spans of SPAN columns give the same bits while a span's numbers stay in
    cache from one step to the next."""
    if not exchange.single:
        return [slice(0, d)]
    return [slice(s, min(s + SPAN, d)) for s in range(0, d, SPAN)]


def _scale_for(field: torch.Tensor, headroom: int) -> torch.Tensor:
    """Per column the power of two 2**((52 - headroom) - top) as float64, built from its exponent
    bits; `field` is the exponent field E of the column's largest magnitude, which is below
    2**(E - 1022), so top = E - 1022 (at least EXP_FLOOR)."""
    top = field.to(torch.int64).clamp_(min=EXP_FLOOR + 1022) - 1022
    return ((INTEGER_BITS - headroom - top + 1023) << 52).view(torch.float64)


def exact_block_sum(fill: Callable[[slice, torch.Tensor], None], k: int, exchange, terms: int, cols: slice,
                    device, largest: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The sum over all ranks of every rank's k vectors, on the columns `cols`, as float64,
    bit-identical for any number of ranks. The vectors come block by block of columns:
    fill(c, out) writes their columns c (within `cols`) into out, a (k, len(c)) float64 scratch
    it may overwrite. `terms` bounds how many vectors there are in all (sets the headroom).
    `largest`, when the caller knows it: this rank's largest magnitude per column of the values
    fill writes, float64 (len(cols),), which it may overwrite (then each block is read once). A
    column where any input is inf or nan comes out nan. Collective: a MAX all_reduce of an int32
    and a SUM all_reduce of a float64 per column.

    Each value is truncated toward zero to a multiple of 2**(top - 52 + headroom), top the
    exponent of the column's largest magnitude over all ranks, so it is an integer-valued float64
    below 2**(52 - headroom) in magnitude: any sum of up to `terms` of them is exact, in any
    order, on any rank count (the SUM all_reduce too)."""
    headroom = max(1, math.ceil(math.log2(max(terms, 2))))
    lo, d = cols.start, cols.stop - cols.start
    width = max(1, EXACT_BLOCK_BYTES // (8 * max(k, 1)))
    blocks = [slice(s, min(s + width, d)) for s in range(0, d, width)] if k else []
    scratch = torch.empty(k, width, dtype=torch.float64, device=device)
    if largest is None:
        largest = torch.zeros(d, dtype=torch.float64, device=device)
        for c in blocks:
            out = scratch[:, :c.stop - c.start]
            fill(slice(lo + c.start, lo + c.stop), out)
            torch.amax(out.abs_(), dim=0, out=largest[c])   # nan and inf propagate
    # The exponent field of each column's largest magnitude (NaN as +Inf: 2047); MAX is exact.
    field = (largest.nan_to_num_(nan=math.inf, posinf=math.inf).view(torch.int64) >> 52).to(torch.int32)
    exchange.all_reduce_max(field)
    scale = _scale_for(field, headroom)
    total = torch.zeros(d, dtype=torch.float64, device=device)
    for c in blocks:
        out = scratch[:, :c.stop - c.start]
        fill(slice(lo + c.start, lo + c.stop), out)
        torch.sum(out.mul_(scale[c]).trunc_(), dim=0, out=total[c])
    exchange.all_reduce_sum(total)
    return total.div_(scale).nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan)


def exact_sum(vectors: List[torch.Tensor], exchange, terms: int, d: int, device) -> torch.Tensor:
    """The sum over all ranks of every rank's `vectors` (each (d,)): exact_block_sum. Collective."""
    def fill(c, out):
        for i, v in enumerate(vectors):
            out[i].copy_(v[c])
    return exact_block_sum(fill, len(vectors), exchange, terms, slice(0, d), device)


class HonestRows:
    """This rank's honest rows, by blocks of columns: view(c) is their (k, len(c)) block, a view
    of the rows when they are consecutive (the usual case), a gathered copy otherwise."""

    def __init__(self, rows: torch.Tensor, positions: List[int]):
        self.rows, self.k = rows, len(positions)
        self.start = positions[0] if positions else 0
        consecutive = positions == list(range(self.start, self.start + self.k))
        self.index = None if consecutive else torch.tensor(positions, device=rows.device)

    def view(self, c: slice) -> torch.Tensor:
        if self.index is None:
            return self.rows[self.start:self.start + self.k, c]
        return self.rows[:, c].index_select(0, self.index)

    def fill(self, c: slice, out: torch.Tensor) -> None:
        out.copy_(self.view(c))

    def extremes(self, cols: slice) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(max, min) per column of `cols` over this rank's honest rows, float64 (NaN
        propagates); None when it hosts none."""
        if not self.k:
            return None
        block = self.view(cols)
        return block.amax(0).double(), block.amin(0).double()


def honest_rows(ctx: AttackContext) -> HonestRows:
    return HonestRows(ctx.rows, [i for i, w in enumerate(ctx.workers)
                                 if w not in ctx.byzantine and ctx.takes_part(w)])


def honest_mean(ctx: AttackContext, cols: Optional[slice] = None,
                extremes: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Mean of the honest vectors (float64, on every rank), on the columns `cols` (default all).
    `extremes`: this rank's honest (max, min) on those columns (HonestRows.extremes), when the
    caller has them. Collective."""
    cols = slice(0, ctx.d) if cols is None else cols
    h = honest_rows(ctx)
    largest = None if extremes is None else torch.maximum(extremes[0], -extremes[1])
    total = exact_block_sum(h.fill, h.k, ctx.exchange, ctx.n, cols, ctx.rows.device, largest)
    return total.div_(len(ctx.honest))


def honest_std(ctx: AttackContext, mean: torch.Tensor, cols: Optional[slice] = None,
               extremes: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Coordinate-wise sample std (denominator h - 1, as torch.std) of the honest vectors, on the
    columns `cols` (default all; `mean` is on those columns). `extremes` as for honest_mean: the
    largest square (g - mean)**2 is then at the max or the min of g (rounding is monotone), so
    the rows are read once. Collective."""
    cols = slice(0, ctx.d) if cols is None else cols
    h = honest_rows(ctx)

    def fill(c, out):   # (g - mean)**2 in float64
        h.fill(c, out)
        out.sub_(mean[c.start - cols.start:c.stop - cols.start]).square_()
    largest = None
    if extremes is not None:
        largest = torch.maximum((extremes[0] - mean).square_(), (extremes[1] - mean).square_())
    total = exact_block_sum(fill, h.k, ctx.exchange, ctx.n, cols, ctx.rows.device, largest)
    return total.div_(len(ctx.honest) - 1).sqrt_()


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


def everyone_to_forge(ctx: AttackContext) -> Optional[torch.Tensor]:
    """`everyone(ctx)` when this rank hosts a Byzantine worker to forge; None otherwise, and
    when the step has no Byzantine worker at all (then no rank joins the collective)."""
    if not ctx.byzantine:
        return None
    rows = everyone(ctx)
    return rows if ctx.local_byzantine else None


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
