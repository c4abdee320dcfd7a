"""A robust aggregation in place of DDP's mean all-reduce, for your own training loop.

    model = DistributedDataParallel(net)
    byzddp.ddp.register(model, rule="cm", f=1)

installs a DDP communication hook (`DistributedDataParallel.register_comm_hook`): one worker per
rank, as DDP has it; every rank's gradient is gathered and the robust pipeline (pre-aggregation,
then the rule) replaces the mean. Two ways through a step:

- bucket by bucket, when everything is coordinate-wise (the rules mean, cm, trimmed_mean, meamed;
  no pre-aggregation, or one that only averages groups drawn from the step's stream; the attacks
  none, bitflip, alie, ipm, nan, inf, zero): as DDP's ring all-reduce does, each rank owns a
  slice of every bucket's coordinates, receives every rank's values there (all_to_all), applies
  the rule to them, and all-gathers the aggregated slices; communication overlaps the backward
  pass, and the rule's work is split across the ranks;
- whole vector, otherwise (krum, rfa, cclip, bulyan, nnm, gaussian, ...): each bucket's Future is
  held back until DDP hands over its last bucket; then the whole gradient is assembled in the
  model's parameter order, forged, aggregated, and every held Future is completed; the
  aggregation is sharded as train.exchange=sharded does it (byzddp/sharded.py: each rank a column
  slice, the Gram matrix from every rank's partials), a plug-in rule that needs whole rows runs
  on the all-gathered rows. DDP
  waits on all the buckets' Futures only after the backward pass, so completing the earlier ones
  from the last bucket's hook is allowed; the canonical order keeps state (cclip's centre, stale's
  history) meaningful across DDP's re-bucketing after the first iteration.

Identical parameters on every rank: each coordinate of the aggregate is computed by one rank and
all-gathered, so the ranks agree by construction; the quantities that span columns (Krum's
distances) are summed from the same partials in the same order on every rank. A plug-in rule that
needs whole rows runs on every rank on the same all-gathered bits with the same random streams
(keyed by seed and step); byzddp's rules are bit-reproducible functions of their input
(docs/design.md), so no rank-0 broadcast is needed. On mixed hardware, where one device's kernels
may round differently, compare `parameter_checksum` across ranks now and then.

Byzantine ranks forge their row inside the hook with byzddp's attacks (omniscient ones learn the
honest rows over the same collectives the trainer uses, byzddp/exchange.py). Everything is
checked at `register` time: a rule that cannot tolerate f, an attack that needs the Byzantine
rank's data (labelflip, backdoor) are one line (ConfigError) naming the argument.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from byzddp import aggregators, attacks, config, pipeline, streams
from byzddp.attacks import AttackContext
from byzddp.distributed import Topology
from byzddp.errors import ConfigError, NonFiniteError
from byzddp.exchange import Exchange
from byzddp.geometry import Columns, all_finite, grid_width
from byzddp.sharded import chunk_bounds

__all__ = ["register", "RobustHook", "parameter_checksum"]

# What can be computed bucket by bucket: the output's coordinate j depends on the rows'
# coordinate j only.
COORDINATE_RULES = ("mean", "cm", "trimmed_mean", "meamed")
COORDINATE_PRE = ("none", "s_replacement", "bucketing", "with_replacement", "fixed_groups")
COORDINATE_ATTACKS = ("none", "bitflip", "alie", "ipm", "nan", "inf", "zero")

# torch 2.14 renamed all_gather_into_tensor (as byzddp/exchange.py, use the new name where it exists).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Config keys as they appear in byzddp's messages -> the register arguments that set them.
_ARGUMENTS = [("aggregator.allow_unsafe=true", "allow_unsafe=True"), ("aggregator.args", "rule_args"),
              ("aggregator.name", "rule"), ("workers.byzantine", "f"), ("attack.count", "byzantine_ranks"),
              ("attack.name", "attack"), ("resampling.name", "pre"), ("resampling.s", "s"),
              ("resampling.tau", "pre_tau"), ("workers.n", "the world size")]


def _in_arguments(message: str) -> str:
    """A config-worded message in the words of register's arguments."""
    message = message.replace("config key ", "byzddp.ddp.register argument ")
    for key, argument in _ARGUMENTS:
        message = message.replace(key, argument)
    message = re.sub(r"\baggregator\.(\w+)", r"\1", message)
    message = re.sub(r"\battack\.(\w+)", r"attack_args['\1']", message)
    return message if message.startswith("byzddp.ddp.register") else f"byzddp.ddp.register: {message}"


def _refuse(message: str) -> None:
    raise ConfigError(f"byzddp.ddp.register: {message}")


def _config(world: int, rule: str, f: int, byzantine: Sequence[int], attack: str, pre: str, s: int,
            seed: int, allow_unsafe: bool, rule_args: dict, attack_args: dict, tau: Optional[float]):
    """The run config these arguments stand for (one worker per rank), checked as train.py checks
    its own: the rule's requirements on (m, f'), the pre-aggregation, the attack."""
    builtin = ":" not in rule
    tree = {"seed": seed,
            "workers": {"n": world, "byzantine": f},
            "aggregator": {"name": rule, "allow_unsafe": allow_unsafe,
                           **(rule_args if builtin else {"args": dict(rule_args)})},
            "resampling": {"name": pre, "s": s, **({} if tau is None else {"tau": tau})},
            "attack": {"name": attack, **({"count": len(byzantine)} if attack != "none" else {}),
                       **(attack_args if ":" not in attack else {"args": dict(attack_args)})}}
    try:
        return config.from_dict(tree)
    except ConfigError as e:
        raise ConfigError(_in_arguments(str(e))) from None


class RobustHook:
    """The hook's state: the pipeline, the attack, the step counter (the synchronised steps, which
    key the random streams), and the buckets held back until the last one. DDP calls
    robust_hook(state=this, bucket); `mode` says which path a step takes."""

    def __init__(self, model, cfg, byzantine: List[int]):
        self.cfg = cfg      # no reference to the model: DDP holds this state, so that would be a cycle
        self.group = model.process_group
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.byzantine = byzantine
        self.pipeline = pipeline.build(cfg)
        self.attack = attacks.from_config(cfg)
        self.attack_pipeline = pipeline.build(cfg) if self.attack.needs_pipeline else None
        self.previous: Optional[torch.Tensor] = None
        device = self.device = next(model.parameters()).device
        self.exchange = Exchange(Topology(self.rank, self.world, self.rank, device,
                                          dist.get_backend(self.group), self.world))
        rule, pre, attack = cfg.aggregator.name, cfg.resampling.name, cfg.attack.name
        self.by_bucket = rule in COORDINATE_RULES and pre in COORDINATE_PRE and attack in COORDINATE_ATTACKS
        # The model's parameter order: where each parameter's gradient sits in the whole vector.
        self.offsets: Dict[int, int] = {}
        start = 0
        for p in model.module.parameters():
            if p.requires_grad:
                self.offsets[p.data_ptr()] = start
                start += p.numel()
        self.d = start
        self.step = 0
        # Whole-vector rules that compute a column slice exactly aggregate sharded (one column
        # slice per rank, as byzddp.sharded lays them out); the others, and models too small for a
        # chunk of the column grid per rank, on all the gathered rows.
        self.columns = None
        width = grid_width(self.d, device)
        chunks = -(-self.d // width)
        if 1 < self.world <= chunks and not self.by_bucket and type(self.pipeline.rule).sharded:
            bounds = chunk_bounds(chunks, self.world)
            counts = [b - a for a, b in bounds]
            self.ranges = [(min(a * width, self.d), min(b * width, self.d)) for a, b in bounds]
            self.lengths = [b - a for a, b in self.ranges]
            first, last = bounds[self.rank]
            self.columns = Columns(self.d, width, first, last,
                                   gather=lambda mine: self.exchange.all_gather_uneven(mine, counts))
        # Buckets held back: whole mode (buffer, its parameters' (canonical, local, numel), Future);
        # bucket mode a dict per bucket (its slice's collectives and Future).
        self.held: list = []


    @property
    def mode(self) -> str:
        """bucket, whole (sharded by columns) or gathered (whole rows on every rank)."""
        return "bucket" if self.by_bucket else "whole" if self.columns is not None else "gathered"

    # -------------------------------------------------------------------- the pipeline

    def _forge(self, row: torch.Tensor) -> None:
        """This rank's (1, width) row, forged in place if it is Byzantine (collective: every
        rank calls it, as omniscient attacks exchange honest statistics)."""
        if not self.byzantine:
            return
        ctx = AttackContext(self.step, self.cfg.seed, row, range(self.rank, self.rank + 1), self.byzantine,
                            self.exchange, self.world, self.cfg.workers.byzantine, self.attack_pipeline,
                            self.previous)
        self.attack.forge(ctx)

    def _aggregate(self, rows: torch.Tensor) -> torch.Tensor:
        """Pre-aggregation and the rule on the (world, width) gathered rows; the streams are
        keyed by (seed, step), as the trainer keys them, so each bucket draws the same groups."""
        p, seed = self.pipeline, self.cfg.seed
        outputs, _ = p.pre(rows, streams.generator("resampling", seed, self.step))
        inputs = {}
        if p.rule.draws:
            inputs["generator"] = streams.generator("aggregator", seed, self.step)
        return p.rule(outputs, **inputs)

    def _gather(self, row: torch.Tensor, async_op: bool):
        rows = torch.empty(self.world, row.shape[1], dtype=row.dtype, device=row.device)
        work = _all_gather_single(rows, row, group=self.group, async_op=async_op)
        return rows, work

    # -------------------------------------------------------------------- the hook

    def _future(self) -> torch.futures.Future:
        """A Future for a bucket's aggregate; on a GPU told its device, so that DDP's read of the
        value waits for the kernels that wrote it."""
        if self.device.type == "cuda":
            return torch.futures.Future(devices=[self.device])
        return torch.futures.Future()

    def __call__(self, bucket):
        if self.by_bucket:
            return self._bucket(bucket)
        return self._whole(bucket)

    def _bucket(self, bucket) -> torch.futures.Future:
        """Coordinate-wise: rank r aggregates the r-th slice of the bucket's coordinates. An
        all_to_all brings it every rank's slice r, the rule runs on those (world, slice) rows,
        and an all_gather returns the aggregated slices: the volume of DDP's ring all-reduce, and
        1/world of the rule's work on each rank; each coordinate is aggregated once, so the ranks
        agree by construction. Pipelined: bucket k's slice is aggregated when bucket k+1 comes
        (its all_to_all ran meanwhile), and the last bucket completes them all. (Cutting buckets
        into smaller pieces to overlap the last one's rule with its communication measured
        slower on gloo: every collective has its own fixed cost.)"""
        buffer = bucket.buffer()
        self._forge(buffer.view(1, -1))
        size, world = buffer.numel(), self.world
        chunk = -(-size // world)
        if chunk * world == size:
            send = buffer
        else:      # padded with zeros to equal slices; the padding's aggregate is dropped
            send = buffer.new_zeros(chunk * world)
            send[:size] = buffer
        recv = buffer.new_empty(world * chunk)
        work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
        fut = self._future()
        for entry in self.held:
            if "gathered" not in entry:
                self._reduce_slice(entry)
        self.held.append({"size": size, "chunk": chunk, "recv": recv, "work": work, "fut": fut})
        if bucket.is_last():
            held, self.held = self.held, []
            for entry in held:
                if "gathered" not in entry:
                    self._reduce_slice(entry)
            for entry in held:     # DDP copies a bucket's result into the gradients itself
                entry["gather_work"].wait()
                entry["fut"].set_result(entry["gathered"][:entry["size"]])
            self.step += 1
        return fut

    def _reduce_slice(self, entry: dict) -> None:
        entry["work"].wait()
        rows = entry["recv"].view(self.world, entry["chunk"])
        part = self._aggregate(rows).contiguous()
        gathered = part.new_empty(self.world * entry["chunk"])
        entry["gather_work"] = _all_gather_single(gathered, part, group=self.group, async_op=True)
        entry["gathered"] = gathered

    def _whole(self, bucket) -> torch.futures.Future:
        """Hold the bucket until the last; then the whole gradient in the model's parameter
        order is forged, aggregated, and written back into every held bucket."""
        buffer = bucket.buffer()
        pieces, local = [], 0
        for p in bucket.parameters():
            pieces.append((self.offsets[p.data_ptr()], local, p.numel()))
            local += p.numel()
        fut = self._future()
        self.held.append((buffer, pieces, fut))
        if not bucket.is_last():
            return fut
        held, self.held = self.held, []
        whole = buffer.new_empty(1, self.d)
        for buf, pieces, _ in held:
            for canonical, at, numel in pieces:
                whole[0, canonical:canonical + numel].copy_(buf[at:at + numel])
        self._forge(whole)
        if self.columns is not None:
            update = self._aggregate_sharded(whole)
        else:
            rows, _ = self._gather(whole, async_op=False)
            update = self._aggregate(rows)
        if self.attack.needs_previous:
            self.previous = update.clone()
        for buf, pieces, f in held:
            for canonical, at, numel in pieces:
                buf[at:at + numel].copy_(update[canonical:canonical + numel])
            f.set_result(buf)
        self.step += 1
        return fut

    def _aggregate_sharded(self, whole: torch.Tensor) -> torch.Tensor:
        """The pipeline as train.exchange=sharded runs it (byzddp/sharded.py): rank r gets column
        slice r of every row (all_to_all), what spans columns (Gram matrices, norms) is summed
        from every rank's per-chunk partials, and the update slices are all-gathered. The same
        bits as on the whole rows, 1/world of the work on each rank."""
        p, seed = self.pipeline, self.cfg.seed
        mine = self.exchange.all_to_all_columns(whole, self.ranges)
        outputs, _ = p.pre(mine, streams.generator("resampling", seed, self.step), self.columns)
        inputs = {}
        if p.rule.draws:
            inputs["generator"] = streams.generator("aggregator", seed, self.step)
        part = p.rule.aggregate(outputs, self.columns, **inputs)
        update = self.exchange.all_gather_uneven(part, self.lengths)
        finite = all_finite(update)
        p.rule.settle(finite)
        if not bool(finite):
            raise NonFiniteError(p.rule._non_finite_message(outputs.shape[0]))
        return update


def robust_hook(state, bucket):
    """The communication hook DDP calls per bucket; `state` is the RobustHook. (No annotations:
    DDP checks them against its own types.)"""
    return state(bucket)


def register(ddp_model, rule: str = "cm", f: Optional[int] = None, byzantine_ranks: Sequence[int] = (),
             attack: str = "none", pre: str = "none", s: int = 2, seed: int = 0, allow_unsafe: bool = False,
             attack_args: Optional[dict] = None, pre_tau: Optional[float] = None, **rule_args) -> RobustHook:
    """Replace `ddp_model`'s mean all-reduce with byzddp's robust aggregation; returns the hook.

    rule: a rule of byzddp.aggregators (or package.module:rule), its parameters as keywords
    (`rule_args`: b=, T=, tau=... as aggregator.<param> in a run's config).
    f: how many ranks may be Byzantine (default: len(byzantine_ranks)).
    byzantine_ranks, attack, attack_args: ranks that forge their gradient with byzddp's attack
    (a simulation; attack_args as attack.<param>). pre, s: the pre-aggregation (bucketing, nnm,
    s_replacement, ...) and its group size; pre_tau: the radius of pre="clipping". seed keys the
    random streams.
    Every problem is a ConfigError with one line, raised here, before any step."""
    from torch.nn.parallel import DistributedDataParallel
    if not isinstance(ddp_model, DistributedDataParallel):
        _refuse(f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, got {type(ddp_model).__name__}")
    if not dist.is_initialized():
        _refuse("no process group: call torch.distributed.init_process_group first")
    group = ddp_model.process_group
    world = dist.get_world_size(group)
    if world != dist.get_world_size():
        _refuse("the model's process group must span every rank (the default group); byzddp's "
                "omniscient attacks and exact sums run on it")
    byzantine = sorted(set(int(r) for r in byzantine_ranks))
    if len(byzantine) != len(tuple(byzantine_ranks)) or any(not 0 <= r < world for r in byzantine):
        _refuse(f"byzantine_ranks must be distinct ranks in [0, {world}), got {tuple(byzantine_ranks)}")
    if byzantine and attack == "none":
        _refuse(f"byzantine_ranks={tuple(byzantine)} with attack='none': name the attack they run "
                f"(e.g. attack='bitflip'), or leave byzantine_ranks empty")
    if attack != "none" and not byzantine:
        _refuse(f"attack='{attack}' needs byzantine_ranks: the ranks that forge")
    if f is None:
        f = len(byzantine)
    if attack != "none":
        cls = attacks.attack_class(attack)
        base = attacks.Attack
        if cls.labels is not base.labels or cls.poison is not base.poison or cls.prepare is not base.prepare:
            _refuse(f"attack '{attack}' changes what a Byzantine rank trains on, which a gradient hook "
                    f"never sees; poison that rank's batches in your loop and register attack='none' "
                    f"(its gradient is then the Byzantine one)")
    if ":" not in rule:
        known = aggregators.PARAMS.get(rule)
        if known is None:
            _refuse(f"rule '{rule}' is not one of {', '.join(aggregators.RULES)} (or package.module:rule)")
        for key in rule_args:
            if key not in known:
                _refuse(f"rule {rule} takes no argument '{key}'; its parameters: {', '.join(known) or 'none'}")
    if attack != "none" and ":" not in attack:
        for key in attack_args or {}:
            if key not in cls.params:
                _refuse(f"attack {attack} takes no attack_args['{key}']; its parameters: "
                        f"{', '.join(cls.params) or 'none'}")
    cfg = _config(world, rule, f, byzantine, attack, pre, s, seed, allow_unsafe, dict(rule_args),
                  dict(attack_args or {}), pre_tau)
    designated = rule_args.get("designated", 0)
    if "designated" in aggregators.rule_class(rule).params and designated in byzantine:
        _refuse(f"rule {rule} trusts rank designated={designated}, which is in byzantine_ranks; designate an "
                f"honest rank")
    if aggregators.rule_class(rule).trusted_root:
        _refuse(f"rule {rule} needs the server's own root-set gradient, which a DDP job has not; choose "
                f"another rule")
    hook = RobustHook(ddp_model, cfg, byzantine)
    ddp_model.register_comm_hook(hook, robust_hook)
    return hook


def parameter_checksum(model) -> torch.Tensor:
    """Two int64 sums of the parameters' bits (plain and position-weighted), for comparing
    replicas across ranks: equal on every rank if and only if (up to collisions) the bits are."""
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    bits = flat.view(torch.int32).to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64) % 65521
    return torch.stack([bits.sum(), (bits * weights).sum()])
