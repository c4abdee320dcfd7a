"""The training loop: workers' vectors -> server (resampling + robust rule) -> the same step on
every replica. Replaces DDP's mean all-reduce.

Each rank sends one row per hosted worker and gets back one payload; byzddp/layout.py names
their columns (RowLayout) and the payload's status codes (Status): OK, NONFINITE when the
aggregate was not finite (the update is then not applied and the run stops at the next check
with the step named), STOP when a rank asked to stop (a signal): all ranks then checkpoint at
the same step and exit.

A rank computes its hosted workers' gradients together, chunk by chunk, with torch.func
(byzddp/workers.py), or one by one with workers.vectorize=false; both write the same rows.

A round is one step of the server. With train.local_steps=K > 1 a worker takes K local SGD
steps from the global model at the round's learning rate on its own batches (local step k of
round t reads the batch, dropout mask and augmentation of index t K + k) and sends its
pseudo-gradient (global - local) / (lr K), computed as the mean of its K gradients (the same
in exact arithmetic, and for K = 1 the gradient itself, bit for bit). Worker momentum, the
server's momentum and weight decay act on what is sent, as for K = 1. With
workers.participation < 1 only the round's drawn workers (byzddp/rounds.py) compute and send;
the rule sees their rows alone.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from byzddp import attacks, checkpoint, config, data, models, pipeline, rounds, sharded, streams, trigger, workers
from byzddp.attacks import AttackContext
from byzddp.distributed import Topology
from byzddp.errors import ConfigError, NonFiniteError
from byzddp.exchange import Exchange
from byzddp.geometry import all_finite
from byzddp.layout import RowLayout, Status


class CollectiveError(RuntimeError):
    """A collective of the step failed or timed out: some rank is stuck or gone."""


class StopRequested(Exception):
    """A signal asked the run to stop; a checkpoint was written."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by signal {signum} after step {step}; checkpoint written")
        self.step, self.signum = step, signum


class Trainer:
    def __init__(self, cfg, topo: Topology, run_dir=None):
        self.cfg, self.topo, self.run_dir = cfg, topo, run_dir
        self.device = topo.device
        self.n = cfg.workers.n
        self.f_declared = cfg.workers.byzantine
        self.local = list(topo.workers)

        self.ds = data.load(cfg).to(self.device)
        self.attack = attacks.from_config(cfg)
        self.attack.prepare(self.ds.train_x, self.ds.num_classes)
        # A fixed Byzantine set samples the whole training set (the paper), unless the attack
        # trains on data of its own (backdoor): then every worker holds a shard.
        fixed = None if cfg.attack.rotate or self.attack.holds_data else attacks.byzantine_set(cfg, 0)
        self.data = data.WorkerData(self.ds, cfg, fixed)
        self.local_steps = cfg.train.local_steps
        # The attack success rate, wherever the trigger can be stamped (clean runs too: the baseline).
        a = cfg.attack
        self.trigger = None
        if trigger.problem(self.ds.train_x.shape[1:], a.trigger_size, a.target_class, self.ds.num_classes) is None:
            self.trigger = trigger.Trigger.for_data(self.ds.train_x, self.ds.num_classes, a.trigger_size,
                                                    a.target_class)

        self.model = models.build(cfg, tuple(self.ds.train_x.shape[1:]), self.ds.num_classes).to(self.device)
        self.params = list(self.model.parameters())
        self.buffers = [b for b in self.model.buffers()]
        self.d = sum(p.numel() for p in self.params)
        self.nb = sum(b.numel() for b in self.buffers)
        self.has_dropout = any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in self.model.modules())

        self.layout = L = RowLayout(self.d, self.nb)
        self.rows = torch.zeros(topo.block, L.width, device=self.device)
        self.payload = torch.zeros(L.width, device=self.device)
        # Each worker's gradient lands straight in its row; the optimizer reads the payload.
        self.row_grads = [self._views(self.rows[i, L.vector]) for i in range(topo.block)]
        self.update_grads = self._views(self.payload[L.update])
        self.notes: List[str] = []      # one-line facts for the start of the log
        self._vectorized_ran = False
        self.vectorized = self._build_vectorized()
        beta = cfg.workers.momentum
        self.worker_momentum = (torch.zeros(topo.block, self.d, device=self.device) if beta > 0 else None)

        t = cfg.train
        self.optimizer = torch.optim.SGD(self.params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.pipeline = pipeline.build(cfg)
        self.resampler, self.aggregator = self.pipeline.pre, self.pipeline.rule
        self.root = self._root_set() if self.pipeline.rule.trusted_root else None   # fltrust
        # Attacks that model the server get their own copy of the pipeline: searching it must not
        # move the server's state (cclip's centre). Attacks that learn from history get the
        # previous step's update, the same on every rank and kept in checkpoints.
        self.attack_pipeline = pipeline.build(cfg) if self.attack.needs_pipeline else None
        self.previous_update: Optional[torch.Tensor] = None
        self.exchange = Exchange(topo)
        # train.exchange=sharded: every rank aggregates a column slice (byzddp/sharded.py); it
        # wraps self.aggregator so that cclip's sliced centre checkpoints whole.
        self.sharded = sharded.ShardedServer(self) if cfg.train.exchange == "sharded" else None

        self.step = 0
        self.selection_counts = torch.zeros(self.n, dtype=torch.long, device=self.device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.history: List[dict] = []
        self.wall_seconds = 0.0
        self.stop_signal = 0
        if self.device.type == "cuda":
            self._status_host = torch.zeros(2, 1, pin_memory=True)
            self._status_ready = [torch.cuda.Event(), torch.cuda.Event()]

    # ------------------------------------------------------------------ building blocks

    def _build_vectorized(self) -> Optional[workers.VectorizedWorkers]:
        """The vectorized workers of workers.vectorize, or None (the loop) with the reason noted."""
        w = self.cfg.workers
        if not w.vectorize:
            self.notes.append("workers computed one by one (workers.vectorize=false)")
            return None
        sample = torch.zeros(self.cfg.train.batch_size, *self.ds.train_x.shape[1:], device=self.device)
        try:
            vec = workers.VectorizedWorkers(self.model, 1, self.cfg.seed, sample)
        except workers.Unsupported as e:
            self.notes.append(f"workers computed one by one: {e}")
            return None
        vec.chunk = w.chunk or vec.automatic_chunk(self.n, self.device.type)
        if not w.chunk and not workers.auto_chunk_pays(self.n, vec.chunk, self.device.type):
            self.notes.append(f"workers computed one by one: on the CPU this model's activations leave "
                              f"{vec.chunk} worker{'s' * (vec.chunk > 1)} a vectorized chunk, where the loop "
                              f"is faster (workers.chunk forces vectorizing)")
            return None
        how = "workers.chunk" if w.chunk else "auto, workers.chunk sets it"
        self.notes.append(f"workers vectorized with torch.func in chunks of {vec.chunk} ({how})")
        return vec

    def _note(self, line: str) -> None:
        if self.topo.is_server:
            print(f"byzddp: {line}", file=sys.stderr, flush=True)

    def _views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        out, start = [], 0
        for p in self.params:
            out.append(flat[start:start + p.numel()].view_as(p))
            start += p.numel()
        return out

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        if t.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step, t.steps) / t.steps))
        if t.lr_schedule == "step":
            return t.lr_decay ** sum(step >= s for s in t.lr_decay_steps)
        return 1.0

    def _flat_buffers(self) -> torch.Tensor:
        if not self.buffers:
            return torch.zeros(0, device=self.device)
        return torch.cat([b.detach().reshape(-1).float() for b in self.buffers])

    def _load_buffers(self, flat: torch.Tensor) -> None:
        start = 0
        for b in self.buffers:
            b.copy_(flat[start:start + b.numel()].view_as(b).to(b.dtype))
            start += b.numel()

    # ------------------------------------------------------------------ the step

    def batch(self, worker: int, t: int, byzantine: bool):
        """Worker's batch at local step index t (a Byzantine worker's, as its attack makes it)."""
        x, y = self.data.batch_of(worker, t)
        if byzantine:
            x, y = self.attack.poison(x, y, self.ds.num_classes)
        return x, y

    def worker_rows(self, step: int, byzantine: List[int], participants: Optional[List[int]] = None) -> None:
        """Fill this rank's rows: each hosted worker's vector, buffers and loss (the round's
        participants only; the others' rows stay zero)."""
        L = self.layout
        self.model.train()
        jobs = []
        for i, w in enumerate(self.local):
            is_byzantine = w in byzantine
            if (is_byzantine and not self.attack.needs_gradient) or (participants is not None and w not in participants):
                continue
            jobs.append((i, w, is_byzantine))
        if self.vectorized is not None and len(jobs) == len(self.local):
            self.rows[len(jobs):].zero_()       # every local row gets overwritten: zero the padding
        else:
            self.rows.zero_()                   # the loop's backward accumulates into the rows
        if jobs and self.local_steps == 1:
            self.gradients([workers.Job(i, w, *self.batch(w, step, b)) for i, w, b in jobs], step)
        elif jobs:
            self.local_rounds(jobs, step)
        jobs = [workers.Job(i, w, None, None) for i, w, _ in jobs]
        beta = self.cfg.workers.momentum
        if self.worker_momentum is not None and jobs:
            # m <- beta m + g for the workers that computed a gradient; elementwise, so the bits
            # are those of one worker at a time.
            k = len(jobs)
            if [j.row for j in jobs] == list(range(k)):
                m = self.worker_momentum[:k]
                m.mul_(beta).add_(self.rows[:k, L.vector])
                self.rows[:k, L.vector].copy_(m)
            else:
                rows = torch.tensor([j.row for j in jobs], device=self.device)
                m = self.worker_momentum.index_select(0, rows).mul_(beta).add_(self.rows[:, L.vector].index_select(0, rows))
                self.worker_momentum.index_copy_(0, rows, m)
                self.rows[:, L.vector].index_copy_(0, rows, m)
        self.rows[:len(self.local), L.stop] = float(self.stop_signal)

    def _vectorized(self, compute) -> bool:
        """Run `compute` on the vectorized workers; False when there are none, or when its first
        call fails on a model torch.func cannot take (then the loop from now on, said once)."""
        if self.vectorized is None:
            return False
        try:
            compute()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:
            if self._vectorized_ran:
                raise
            self._note(f"workers computed one by one: torch.func failed on this model "
                       f"({str(e).splitlines()[0][:160]})")
            self.vectorized = None
            return False
        self._vectorized_ran = True
        return True

    def gradients(self, jobs: List[workers.Job], step: int) -> None:
        """Each job's gradient, BatchNorm buffers and loss into its row: vectorized, or the loop."""
        L = self.layout
        tried = self.vectorized is not None
        if self._vectorized(lambda: self.vectorized.compute(
                jobs, step, self.rows[:, L.vector], self.rows[:, L.buffers] if self.nb else None,
                self.rows[:, L.loss])):
            return
        if tried:   # a failed first vectorized call may have written rows; backward accumulates into them
            self.rows.zero_()
        replica_buffers = self._flat_buffers() if self.nb else None
        for job in jobs:
            i = job.row
            if self.has_dropout:
                torch.manual_seed(streams.key("dropout", self.cfg.seed, job.worker, step))
            for p, g in zip(self.params, self.row_grads[i]):
                p.grad = g
            loss = F.cross_entropy(self.model(job.x), job.y)
            loss.backward()
            if self.nb:
                self.rows[i, L.buffers] = self._flat_buffers()
                self._load_buffers(replica_buffers)
            self.rows[i, L.loss] = loss.detach()

    def local_rounds(self, jobs: List[tuple], step: int) -> None:
        """train.local_steps = K > 1: each (row, worker, byzantine) job's K local SGD steps from
        the global model; its row gets the mean of its K gradients, its BatchNorm buffers after
        the last step and its mean loss over the K steps. The replica is left as it was."""
        L, K = self.layout, self.local_steps
        lr = self.optimizer.param_groups[0]["lr"]
        rows = torch.tensor([i for i, _, _ in jobs], device=self.device)
        start = torch.cat([p.detach().reshape(-1) for p in self.params])
        replica_buffers = self._flat_buffers() if self.nb else None
        total = torch.zeros(len(jobs), self.d, device=self.device)
        losses = torch.zeros(len(jobs), device=self.device)
        if self._vectorized(lambda: self._vectorized_local_steps(jobs, step, lr, start, replica_buffers,
                                                                 total, losses, rows)):
            return
        total.zero_()
        losses.zero_()
        grad = torch.zeros(self.d, device=self.device)
        views = self._views(grad)
        for j, (i, w, byzantine) in enumerate(jobs):
            for k in range(K):
                t = step * K + k
                x, y = self.batch(w, t, byzantine)
                if self.has_dropout:
                    torch.manual_seed(streams.key("dropout", self.cfg.seed, w, t))
                grad.zero_()
                for p, g in zip(self.params, views):
                    p.grad = g
                loss = F.cross_entropy(self.model(x), y)
                loss.backward()
                total[j] += grad
                losses[j] += loss.detach()
                with torch.no_grad():
                    for p, g in zip(self.params, views):
                        p.add_(g, alpha=-lr)
            if self.nb:
                self.rows[i, L.buffers] = self._flat_buffers()
                self._load_buffers(replica_buffers)
            with torch.no_grad():
                for p, v in zip(self.params, self._views(start)):
                    p.copy_(v)
        self.rows[:, L.vector].index_copy_(0, rows, total / K)
        self.rows[:, L.loss].index_copy_(0, rows, losses / K)

    def _vectorized_local_steps(self, jobs, step, lr, start, replica_buffers, total, losses, rows) -> None:
        """local_rounds on torch.func: every worker at its own parameters, chunk by chunk."""
        L, K = self.layout, self.local_steps
        own = start.expand(len(jobs), self.d).clone()
        buffers = replica_buffers.expand(len(jobs), self.nb).clone() if self.nb else None
        grad = torch.empty(len(jobs), self.d, device=self.device)
        loss = torch.empty(len(jobs), device=self.device)
        for k in range(K):
            t = step * K + k
            part = [workers.Job(j, w, *self.batch(w, t, b)) for j, (_, w, b) in enumerate(jobs)]
            after = torch.empty_like(buffers) if self.nb else None
            if k == 0:      # every worker at the global model: shared weights, the cheaper vmap
                self.vectorized.compute(part, t, grad, after, loss)
            else:
                self.vectorized.compute(part, t, grad, after, loss, own_params=own, own_buffers=buffers)
            total += grad
            losses += loss
            own.add_(grad, alpha=-lr)
            buffers = after
        if self.nb:
            self.rows[:, L.buffers].index_copy_(0, rows, buffers)
        self.rows[:, L.vector].index_copy_(0, rows, total / K)
        self.rows[:, L.loss].index_copy_(0, rows, losses / K)

    def _root_set(self) -> tuple:
        """fltrust's trusted root set: aggregator.root_size training examples, drawn once from a
        stream keyed by the seed (the same on every rank)."""
        size, total = self.cfg.aggregator.root_size, len(self.ds.train_y)
        if size > total:
            raise ConfigError(f"config key aggregator.root_size: {size} root examples but the training set "
                              f"holds {total}; lower aggregator.root_size")
        pick = torch.randperm(total, generator=streams.generator("root", self.cfg.seed))[:size].to(self.device)
        return self.ds.train_x[pick], self.ds.train_y[pick]

    def root_gradient(self, step: int) -> torch.Tensor:
        """fltrust: the server's gradient g0 on its root set with the current model (train mode, as
        the workers), flat; the replica's BatchNorm buffers are left as they were. Every rank that
        aggregates computes it from the same replica and data, so it is the same on all."""
        x, y = self.root
        replica_buffers = self._flat_buffers() if self.nb else None
        if self.has_dropout:
            torch.manual_seed(streams.key("root-dropout", self.cfg.seed, step))
        with torch.enable_grad():
            grads = torch.autograd.grad(F.cross_entropy(self.model(x), y), self.params)
        if self.nb:
            self._load_buffers(replica_buffers)
        return torch.cat([g.reshape(-1) for g in grads])

    def rule_inputs(self, step: int) -> dict:
        """What the rule takes besides its rows: the step's random stream, keyed by (seed, step) so
        that every rank draws the same (dnc, signguard), and the root gradient (fltrust)."""
        rule, inputs = self.pipeline.rule, {}
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

    def server_step(self, gathered: torch.Tensor, step: int, byzantine: List[int],
                    participants: Optional[List[int]] = None) -> None:
        """On rank 0: pre-aggregation, the robust rule, the payload to broadcast."""
        L = self.layout
        participants = list(range(self.n)) if participants is None else participants
        vectors = self.taking_part(gathered[:, L.vector], participants)
        outputs, groups = self.resampler(vectors, streams.generator("resampling", self.cfg.seed, step))
        # Checked on the device, no host sync (but dnc's and signguard's data-dependent selection).
        update = self.aggregator.aggregate(outputs, **self.rule_inputs(step))
        self.finish_payload(update, gathered[:, L.tail], groups, step, byzantine, participants)

    def finish_payload(self, update: torch.Tensor, tails: torch.Tensor, groups: List[torch.Tensor],
                       step: int, byzantine: List[int], participants: Optional[List[int]] = None) -> None:
        """The payload from the aggregate and every worker's row tail, [buffers | loss | stop]:
        the update (zeros when it is not finite), the first honest participant's buffers, the
        honest participants' mean loss and the status. On the device, without a host sync.
        `groups` index the participants' rows."""
        L, T = self.layout, RowLayout(0, self.nb)       # T: the columns of a row's tail
        participants = list(range(self.n)) if participants is None else participants
        honest = [w for w in participants if w not in byzantine]
        if len(participants) < self.n:
            ids = torch.tensor(participants)
            groups = [ids[g.long()] for g in groups]
        bad = ~all_finite(update)
        if self.aggregator.selected is not None:
            self.count_selections(self.aggregator.selected, groups)
        p = self.payload
        p[L.update] = torch.where(bad, torch.zeros_like(update), update)
        if self.nb:
            p[L.buffers] = tails[honest[0], T.buffers]
        p[L.train_loss] = tails[honest, T.loss].mean()
        stop = (tails[:, T.stop].max() > 0).float() * Status.STOP
        p[L.status] = torch.where(bad, torch.full_like(stop, Status.NONFINITE), stop)
        self.first_bad_step.copy_(torch.where(bad & (self.first_bad_step < 0),
                                              torch.full_like(self.first_bad_step, step), self.first_bad_step))

    def count_selections(self, selected: torch.Tensor, groups: List[torch.Tensor]) -> None:
        """+1 for every logical worker behind each selected output (once per output, however
        often it appears in the group); tensor ops on the device, no host sync."""
        members = torch.zeros(len(groups), self.n, dtype=torch.long)
        sizes = torch.tensor([len(g) for g in groups])
        members[torch.arange(len(groups)).repeat_interleave(sizes), torch.cat(groups).long()] = 1
        members = members.to(self.device, non_blocking=True)
        self.selection_counts += members.index_select(0, selected.to(self.device)).sum(0)

    def train_step(self) -> None:
        step = self.step
        participants = rounds.participants(self.cfg, step)
        everyone = len(participants) == self.n
        byzantine = [w for w in attacks.byzantine_set(self.cfg, step) if everyone or w in participants]
        self.worker_rows(step, byzantine, None if everyone else participants)
        ctx = AttackContext(step, self.cfg.seed, self.rows[:, self.layout.vector], self.topo.workers, byzantine,
                            self.exchange, len(participants), self.f_declared, self.attack_pipeline,
                            self.previous_update, None if everyone else participants)
        self.attack.forge(ctx)
        if self.sharded is not None:   # all_to_all, the rule per slice, all_gather of the update
            self.sharded.step(step, byzantine, participants)
        else:                          # gather to rank 0, the rule, broadcast
            gathered = self.exchange.gather(self.rows)
            if self.topo.is_server:
                self.server_step(gathered, step, byzantine, participants)
            self.exchange.broadcast(self.payload)
        if self.attack.needs_previous:
            self.previous_update = self.payload[self.layout.update].clone()
        self.apply(self.payload)
        self.step += 1

    def guarded_step(self) -> None:
        """One step; a collective that fails or times out names the step and the likely cause."""
        if self.topo.world == 1:
            return self.train_step()
        try:
            self.train_step()
        except (RuntimeError, dist.DistError) as e:
            raise CollectiveError(
                f"step {self.step + 1}: a collective failed or timed out after train.timeout_s="
                f"{self.cfg.train.timeout_s:g}s; a rank is stuck or died ({str(e).splitlines()[0][:200]})") from e

    def apply(self, payload: torch.Tensor) -> None:
        for p, g in zip(self.params, self.update_grads):
            p.grad = g
        self.optimizer.step()
        self.scheduler.step()
        if self.nb:
            self._load_buffers(payload[self.layout.buffers])

    # ------------------------------------------------------------------ checks and evaluation

    def poll_status(self) -> float:
        """The status of a recent payload, the same step's on every rank.

        On CPU that is the step just taken. On CUDA, reading it would stall the queue every
        step, so the status is copied without blocking and read one step later.
        """
        status = self.layout.status
        if self.device.type != "cuda":
            return float(self.payload[status])
        slot = self.step % 2
        self._status_host[slot].copy_(self.payload[status:status + 1], non_blocking=True)
        self._status_ready[slot].record()
        if self.step < 2:
            return 0.0
        self._status_ready[1 - slot].synchronize()
        return float(self._status_host[1 - slot])

    def check_finite(self) -> None:
        bad = int(self.first_bad_step)
        if bad >= 0:
            raise NonFiniteError(
                f"the aggregate at step {bad + 1} was not finite (rule {self.cfg.aggregator.name} cannot "
                f"absorb NaN/Inf inputs); the update was not applied; use a robust rule or find the bad worker")

    def replicas_agree(self) -> bool:
        bits = torch.cat([p.detach().reshape(-1) for p in self.params]).view(torch.int32).to(torch.int64)
        weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64) % 65521
        checksum = torch.stack([bits.sum(), (bits * weights).sum()])
        return self.exchange.all_agree(checksum)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Test accuracy and loss; the test set is split across ranks and the sums reduced."""
        self.model.eval()
        x, y = self.ds.test_x, self.ds.test_y
        world, rank = self.topo.world, self.topo.rank
        lo, hi = rank * len(y) // world, (rank + 1) * len(y) // world
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        bs = self.cfg.train.eval_batch_size
        for start in range(lo, hi, bs):
            end = min(start + bs, hi)
            logits = self.model(x[start:end])
            sums[0] += (logits.argmax(1) == y[start:end]).sum()
            sums[1] += F.cross_entropy(logits, y[start:end], reduction="sum").double()
            sums[2] += y[start:end].numel()     # examples; tokens for sequences (text)
            if self.trigger is not None:
                sums[3:] += self.trigger.hits(self.model, x[start:end], y[start:end])
        self.exchange.all_reduce_sum(sums)
        correct, loss, count, hits, others = sums.tolist()
        self.model.train()
        out = {"test_accuracy": correct / count, "test_loss": loss / count}
        if self.trigger is not None:
            out["attack_success_rate"] = hits / others if others else 0.0
        return out

    def model_sha256(self) -> str:
        import hashlib
        h = hashlib.sha256()
        for name, t in self.model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ checkpointable

    def state_dict(self) -> dict:
        """Everything the run's future depends on. Collective: call on every rank."""
        momentum = None
        if self.worker_momentum is not None:
            momentum = self.exchange.gather(self.worker_momentum)
        return {
            "config_hash": config.config_hash(self.cfg),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "worker_momentum": momentum,
            "aggregator": self.aggregator.state_dict(),
            "resampler": self.resampler.state_dict(),
            "attack": self.attack.state_dict(),
            "previous_update": self.previous_update,
            "selection_counts": self.selection_counts.clone(),
            "first_bad_step": int(self.first_bad_step),
            "history": list(self.history),
            "wall_seconds": self.wall_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.worker_momentum is not None:
            mine = state["worker_momentum"][self.local[0]:self.local[-1] + 1]
            self.worker_momentum[:len(self.local)].copy_(mine)
        self.aggregator.load_state_dict(state["aggregator"])
        self.resampler.load_state_dict(state["resampler"])
        self.attack.load_state_dict(state["attack"])
        previous = state["previous_update"]
        self.previous_update = None if previous is None else previous.to(self.device)
        self.selection_counts.copy_(state["selection_counts"])
        self.first_bad_step.fill_(state["first_bad_step"])
        self.history = list(state["history"])
        self.wall_seconds = state["wall_seconds"]

    # ------------------------------------------------------------------ the loop

    def request_stop(self, signum, _frame=None) -> None:
        self.stop_signal = signum

    def fit(self, log) -> dict:
        cfg, t = self.cfg, self.cfg.train
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        log.start(self)
        for line in self.notes:
            self._note(line)
        started = time.perf_counter() - self.wall_seconds   # training time, not set-up
        while self.step < t.steps:
            self.guarded_step()
            status = self.poll_status()
            step = self.step
            log.tick(step)
            if status == Status.NONFINITE:
                self.check_finite()
            if t.check_every and step % t.check_every == 0 and not self.replicas_agree():
                raise RuntimeError(f"replicas differ after step {step}: the ranks' models drifted apart; "
                                   f"this is a bug in the harness or a non-deterministic kernel")
            if step % t.eval_every == 0 or step == t.steps:
                self.wall_seconds = time.perf_counter() - started
                record = {"step": step, **self.evaluate(), "train_loss": float(self.payload[self.layout.train_loss]),
                          "lr": self.optimizer.param_groups[0]["lr"], "wall_seconds": self.wall_seconds}
                self.history.append(record)
                log.metrics(record)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or status == Status.STOP:
                self.wall_seconds = time.perf_counter() - started
                checkpoint.save(self, log.run_dir, keep=t.keep_checkpoints)
            if status == Status.STOP:
                raise StopRequested(step, int(self.stop_signal) or signal.SIGTERM)
        self.check_finite()
        self.wall_seconds = time.perf_counter() - started
        return self.summary()

    def summary(self) -> dict:
        acc = [h["test_accuracy"] for h in self.history]
        asr = [h["attack_success_rate"] for h in self.history if "attack_success_rate" in h]
        counts = self.selection_counts.tolist() if self.aggregator.selected is not None or \
            any(self.selection_counts.tolist()) else None
        return {
            "final_test_accuracy": acc[-1] if acc else None,
            "final_test_accuracy_last5": sum(acc[-5:]) / len(acc[-5:]) if acc else None,
            "best_test_accuracy": max(acc) if acc else None,
            "final_test_loss": self.history[-1]["test_loss"] if self.history else None,
            # share of triggered test examples of other classes classified as attack.target_class
            # (byzddp/trigger.py); None where the trigger cannot be stamped
            "final_attack_success_rate": asr[-1] if asr else None,
            "steps": self.step,
            "wall_seconds": self.wall_seconds,
            "model_sha256": self.model_sha256(),
            "selection_counts": counts,
            "attack": self.cfg.attack.name,
            "byzantine_declared": self.f_declared,
            "byzantine_real": attacks.real_f(self.cfg),
            "byzantine_policy": attacks.policy(self.cfg),
            "world_size": self.topo.world,
            "backend": self.topo.backend,
            "device": str(self.device),
            "parameters": self.d,
            "local_steps": self.local_steps,
            "workers_per_round": rounds.workers_per_round(self.cfg),
        }
