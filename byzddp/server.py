"""The server side of a step (ByzFL's server, Flower's strategy): every worker's row in, the
payload out.

`Server.aggregate` takes the gathered (n, width) rows: the round's participants' vectors go
through the pre-aggregation (resampling, bucketing, nnm, ...) and the robust rule, given what it
takes besides its rows (the step's random stream, fltrust's root gradient); `finish_payload`
writes the payload the loop broadcasts, [update | buffers | train loss | status], laid out by
byzddp/layout.py, and counts which workers the rule selected. All on the device, without a host
sync, except where a rule's selection is data-dependent (dnc, signguard). On the rounds the loop
asks for, `diagnose` compares the output with the honest workers' mean (byzddp/diagnostics.py).

The rule's output is checked every step: its shape, dtype and device are the server's contract
(one line naming aggregator.name when broken); a non-finite update is never applied, and the
check that stops the run says whether the rule made NaN/Inf from finite inputs.

Under train.exchange=sharded every rank runs a Server on its column slice (byzddp/sharded.py).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from byzddp import diagnostics, pipeline, streams
from byzddp.errors import ConfigError, NonFiniteError
from byzddp.geometry import all_finite
from byzddp.layout import RowLayout, Status
from byzddp.replica import Replica


class RuleOutputError(ConfigError):
    """The rule returned something that is not a floating-point update of the rows' columns on
    their device: one line naming aggregator.name, exit status 2, as for a bad config."""


class Server:
    def __init__(self, cfg, replica: Replica, train_x: torch.Tensor, train_y: torch.Tensor):
        self.cfg, self.replica = cfg, replica
        self.n, self.device = cfg.workers.n, replica.device
        self.layout = L = RowLayout(replica.d, replica.nb)
        self.payload = torch.zeros(L.width, device=self.device)
        self.pipeline = pipeline.build(cfg)
        self.resampler, self.aggregator = self.pipeline.pre, self.pipeline.rule
        self.root = self._root_set(train_x, train_y) if self.aggregator.trusted_root else None   # fltrust
        self.selection_counts = torch.zeros(self.n, dtype=torch.long, device=self.device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.inputs_were_finite = torch.zeros((), dtype=torch.bool, device=self.device)   # at the first bad step
        self.diagnosed = diagnostics.Record()

    # ------------------------------------------------------------------ the rule's inputs

    def _root_set(self, train_x: torch.Tensor, train_y: torch.Tensor) -> tuple:
        """fltrust's trusted root set: aggregator.root_size training examples, drawn once from a
        stream keyed by the seed (the same on every rank)."""
        size, total = self.cfg.aggregator.root_size, len(train_y)
        if size > total:
            raise ConfigError(f"config key aggregator.root_size: {size} root examples but the training set "
                              f"holds {total}; lower aggregator.root_size")
        pick = torch.randperm(total, generator=streams.generator("root", self.cfg.seed))[:size].to(self.device)
        return train_x[pick], train_y[pick]

    def root_gradient(self, step: int) -> torch.Tensor:
        """fltrust: the server's gradient g0 on its root set with the current model (train mode, as
        the workers), flat; the replica's BatchNorm buffers are left as they were. Every rank that
        aggregates computes it from the same replica and data, so it is the same on all."""
        x, y = self.root
        R = self.replica
        replica_buffers = R.flat_buffers() if R.nb else None
        if R.has_dropout:
            torch.manual_seed(streams.key("root-dropout", self.cfg.seed, step))
        with torch.enable_grad():
            grads = torch.autograd.grad(F.cross_entropy(R.model(x), y), R.params)
        if R.nb:
            R.load_buffers(replica_buffers)
        return torch.cat([g.reshape(-1) for g in grads])

    def rule_inputs(self, step: int) -> dict:
        """What the rule takes besides its rows: the step's random stream, keyed by (seed, step) so
        that every rank draws the same (dnc, signguard), and the root gradient (fltrust)."""
        rule, inputs = self.aggregator, {}
        if rule.draws:
            inputs["generator"] = streams.generator("aggregator", self.cfg.seed, step)
        if rule.trusted_root:
            inputs["root_gradient"] = self.root_gradient(step)
        return inputs

    def taking_part(self, vectors: torch.Tensor, participants: List[int]) -> torch.Tensor:
        """The participants' rows of `vectors` (all n rows, in worker order): what the rule sees."""
        if len(participants) == self.n:
            return vectors
        return vectors.index_select(0, torch.tensor(participants, device=vectors.device))

    # ------------------------------------------------------------------ the step

    def aggregate(self, gathered: torch.Tensor, step: int, byzantine: List[int],
                  participants: Optional[List[int]] = None, diagnose: bool = False) -> None:
        """On rank 0: pre-aggregation, the robust rule, the payload to broadcast (and, when
        `diagnose`, the round's diagnostics)."""
        L = self.layout
        participants = list(range(self.n)) if participants is None else participants
        vectors = self.taking_part(gathered[:, L.vector], participants)
        outputs, groups = self.resampler(vectors, streams.generator("resampling", self.cfg.seed, step))
        update = self.aggregator.aggregate(outputs, **self.rule_inputs(step))
        self.check_output(update, outputs)
        self.finish_payload(update, gathered[:, L.tail], groups, step, byzantine, participants, outputs)
        if diagnose:
            self.diagnose(vectors, update, groups, byzantine, participants)

    def diagnose(self, vectors: torch.Tensor, update: torch.Tensor, groups: List[torch.Tensor],
                 byzantine: List[int], participants: List[int], columns=None) -> None:
        """The round's diagnostics (byzddp/diagnostics.py) into `diagnosed`. `vectors`: the
        participants' rows, `update` the rule's output, both on this rank's columns (`columns`, its
        plan under sharded aggregation: then a collective); `groups` index the participants' rows."""
        honest = [i for i, w in enumerate(participants) if w not in byzantine]
        totals = diagnostics.sums(vectors, update, honest, columns)
        self.diagnosed.add(diagnostics.of_round(totals, len(honest), len(byzantine), self.aggregator.selected,
                                                self._worker_groups(groups, participants), byzantine))

    def _worker_groups(self, groups: List[torch.Tensor], participants: List[int]) -> List[torch.Tensor]:
        """The logical workers behind each row the rule saw (`groups` index the participants' rows)."""
        if len(participants) == self.n:
            return groups
        ids = torch.tensor(participants)
        return [ids[g.long()] for g in groups]

    def check_output(self, update, outputs: torch.Tensor) -> None:
        """The rule's contract, read from metadata alone (no host sync): one floating-point value
        per column of its input rows (a slice's columns under sharded aggregation), on their device."""
        name, want = self.cfg.aggregator.name, outputs.shape[1]
        problem = None
        if not isinstance(update, torch.Tensor):
            problem = f"a {type(update).__name__}, not a tensor"
        elif tuple(update.shape) != (want,):
            problem = (f"shape {tuple(update.shape)} for {outputs.shape[0]} rows of {want} columns; "
                       f"return a ({want},) tensor")
        elif not update.is_floating_point():
            problem = (f"dtype {update.dtype}, which would be applied as a truncated update; return it in "
                       f"the rows' dtype ({outputs.dtype})")
        elif update.device != outputs.device:
            problem = (f"its update on {update.device}, the rows are on {outputs.device}; return it on the "
                       f"rows' device")
        if problem:
            raise RuleOutputError(f"config key aggregator.name: the rule '{name}' returned {problem}")

    def finish_payload(self, update: torch.Tensor, tails: torch.Tensor, groups: List[torch.Tensor],
                       step: int, byzantine: List[int], participants: Optional[List[int]] = None,
                       outputs: Optional[torch.Tensor] = None) -> None:
        """The payload from the aggregate and every worker's row tail, [buffers | loss | stop]:
        the update (zeros when it is not finite), the first honest participant's buffers, the
        honest participants' mean loss and the status. On the device, without a host sync.
        `groups` index the participants' rows; `outputs` are the rule's inputs (to tell, at the
        first bad step, a rule that made NaN/Inf from finite rows)."""
        L, T = self.layout, RowLayout(0, self.replica.nb)       # T: the columns of a row's tail
        participants = list(range(self.n)) if participants is None else participants
        honest = [w for w in participants if w not in byzantine]
        groups = self._worker_groups(groups, participants)
        bad = ~all_finite(update)
        if self.aggregator.selected is not None:
            self.count_selections(self.aggregator.selected, groups)
        p = self.payload
        p[L.update] = torch.where(bad, torch.zeros_like(update), update)
        if self.replica.nb:
            p[L.buffers] = tails[honest[0], T.buffers]
        p[L.train_loss] = tails[honest, T.loss].mean()
        stop = (tails[:, T.stop].max() > 0).float() * Status.STOP
        p[L.status] = torch.where(bad, torch.full_like(stop, Status.NONFINITE), stop)
        self._note_bad_step(bad, step, outputs)

    def _note_bad_step(self, bad: torch.Tensor, step: int, outputs: Optional[torch.Tensor]) -> None:
        first = bad & (self.first_bad_step < 0)
        # Were the rule's inputs finite at the first bad step? On the CPU reading the flag is free,
        # so the inputs are looked at then only; elsewhere a device-side where, every step.
        if outputs is not None and (self.device.type != "cpu" or bool(first)):
            self.inputs_were_finite.copy_(torch.where(first, all_finite(outputs), self.inputs_were_finite))
        self.first_bad_step.copy_(torch.where(first, torch.full_like(self.first_bad_step, step), self.first_bad_step))

    def count_selections(self, selected: torch.Tensor, groups: List[torch.Tensor]) -> None:
        """+1 for every logical worker behind each selected output (once per output, however
        often it appears in the group); tensor ops on the device, no host sync."""
        members = torch.zeros(len(groups), self.n, dtype=torch.long)
        sizes = torch.tensor([len(g) for g in groups])
        members[torch.arange(len(groups)).repeat_interleave(sizes), torch.cat(groups).long()] = 1
        members = members.to(self.device, non_blocking=True)
        self.selection_counts += members.index_select(0, selected.to(self.device)).sum(0)

    def check_finite(self) -> None:
        """Stop the run, naming the step, when an aggregate was not finite."""
        bad = int(self.first_bad_step)
        if bad < 0:
            return
        name = self.cfg.aggregator.name
        if bool(self.inputs_were_finite):
            raise NonFiniteError(
                f"the aggregate at step {bad + 1} was not finite although every row the rule {name} saw was "
                f"finite: the rule itself produced NaN/Inf (a division by zero or an overflow in "
                f"aggregator {name}?); the update was not applied")
        raise NonFiniteError(
            f"the aggregate at step {bad + 1} was not finite (rule {name} cannot "
            f"absorb NaN/Inf inputs); the update was not applied; use a robust rule or find the bad worker")

    # ------------------------------------------------------------------ checkpointable

    def state_dict(self) -> dict:
        return {
            "aggregator": self.aggregator.state_dict(),
            "resampler": self.resampler.state_dict(),
            "selection_counts": self.selection_counts.clone(),
            "first_bad_step": int(self.first_bad_step),
            "diagnostics": self.diagnosed.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.aggregator.load_state_dict(state["aggregator"])
        self.resampler.load_state_dict(state["resampler"])
        self.selection_counts.copy_(state["selection_counts"])
        self.first_bad_step.fill_(state["first_bad_step"])
        self.diagnosed.load_state_dict(state["diagnostics"])
