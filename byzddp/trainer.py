"""The training loop: workers' vectors -> server (resampling + robust rule) -> the same step on
every replica. Replaces DDP's mean all-reduce.

Each rank sends one row per hosted worker, laid out as
    [ vector (d) | BatchNorm buffers after its forward (nb) | batch loss | stop request ]
and gets back one payload
    [ aggregated update (d) | buffers of the first honest worker (nb) | train loss | status ].
status is 0, or 1 when the aggregate was not finite (the update is then not applied and the
run stops at the next check with the step named), or 2 when a rank asked to stop (a signal):
all ranks then checkpoint at the same step and exit.
"""
from __future__ import annotations

import math
import signal
import time
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from byzddp import aggregators, attacks, checkpoint, config, data, models, resampling, sharded, streams
from byzddp.attacks import AttackContext
from byzddp.distributed import Topology
from byzddp.exchange import Exchange

STATUS_NONFINITE, STATUS_STOP = 1.0, 2.0


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
        fixed = None if cfg.attack.rotate else attacks.byzantine_set(cfg, 0)
        self.data = data.WorkerData(self.ds, cfg, fixed)

        self.model = models.build(cfg, tuple(self.ds.train_x.shape[1:]), self.ds.num_classes).to(self.device)
        self.params = list(self.model.parameters())
        self.buffers = [b for b in self.model.buffers()]
        self.d = sum(p.numel() for p in self.params)
        self.nb = sum(b.numel() for b in self.buffers)
        self.has_dropout = any(isinstance(m, torch.nn.Dropout) for m in self.model.modules())

        width = self.d + self.nb + 2
        self.rows = torch.zeros(topo.block, width, device=self.device)
        self.payload = torch.zeros(self.d + self.nb + 2, device=self.device)
        # Each worker's backward writes straight into its row; the optimizer reads the payload.
        self.row_grads = [self._views(self.rows[i, :self.d]) for i in range(topo.block)]
        self.update_grads = self._views(self.payload[:self.d])
        beta = cfg.workers.momentum
        self.worker_momentum = (torch.zeros(topo.block, self.d, device=self.device) if beta > 0 else None)

        t = cfg.train
        self.optimizer = torch.optim.SGD(self.params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.resampler = resampling.from_config(cfg)
        self.aggregator = aggregators.from_config(cfg)
        self.attack = attacks.build(cfg)
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

    def worker_rows(self, step: int, byzantine: List[int]) -> None:
        """Fill this rank's rows: each hosted worker's vector, buffers and loss."""
        self.rows.zero_()
        self.model.train()
        replica_buffers = self._flat_buffers()
        d, nb = self.d, self.nb
        beta = self.cfg.workers.momentum
        for i, w in enumerate(self.local):
            is_byzantine = w in byzantine
            if is_byzantine and not self.attack.needs_gradient:
                continue
            x, y = self.data.batch_of(w, step)
            if is_byzantine:
                y = self.attack.labels(y, self.ds.num_classes)
            if self.has_dropout:
                torch.manual_seed(streams.key("dropout", self.cfg.seed, w, step))
            for p, g in zip(self.params, self.row_grads[i]):
                p.grad = g
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            if self.worker_momentum is not None:
                m = self.worker_momentum[i]
                m.mul_(beta).add_(self.rows[i, :d])
                self.rows[i, :d].copy_(m)
            if nb:
                self.rows[i, d:d + nb] = self._flat_buffers()
                self._load_buffers(replica_buffers)
            self.rows[i, -2] = loss.detach()
        self.rows[:len(self.local), -1] = float(self.stop_signal)

    def server_step(self, gathered: torch.Tensor, step: int, byzantine: List[int]) -> None:
        """On rank 0: pre-aggregation, the robust rule, the payload to broadcast."""
        d, nb = self.d, self.nb
        honest = [w for w in range(self.n) if w not in byzantine]
        vectors = gathered[:, :d]
        outputs, groups = self.resampler(vectors, streams.generator("resampling", self.cfg.seed, step))
        update = self.aggregator.aggregate(outputs)   # no host sync: checked on the device
        bad = ~torch.isfinite(update).all()
        if self.aggregator.selected is not None:
            for j in self.aggregator.selected.tolist():
                self.selection_counts[groups[j].unique()] += 1
        p = self.payload
        p[:d] = torch.where(bad, torch.zeros_like(update), update)
        if nb:
            p[d:d + nb] = gathered[honest[0], d:d + nb]
        p[-2] = gathered[honest, -2].mean()
        stop = (gathered[:, -1].max() > 0).float() * STATUS_STOP
        p[-1] = torch.where(bad, torch.full_like(stop, STATUS_NONFINITE), stop)
        self.first_bad_step.copy_(torch.where(bad & (self.first_bad_step < 0),
                                              torch.full_like(self.first_bad_step, step), self.first_bad_step))

    def train_step(self) -> None:
        step = self.step
        byzantine = attacks.byzantine_set(self.cfg, step)
        self.worker_rows(step, byzantine)
        ctx = AttackContext(step, self.cfg.seed, self.rows[:, :self.d], self.topo.workers, byzantine,
                            self.exchange, self.n, self.f_declared)
        self.attack.forge(ctx)
        if self.sharded is not None:   # all_to_all, the rule per slice, all_gather of the update
            self.sharded.step(step, byzantine)
        else:                          # gather to rank 0, the rule, broadcast
            gathered = self.exchange.gather(self.rows)
            if self.topo.is_server:
                self.server_step(gathered, step, byzantine)
            self.exchange.broadcast(self.payload)
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
                f"step {self.step}: a collective failed or timed out after train.timeout_s="
                f"{self.cfg.train.timeout_s:g}s; a rank is stuck or died ({str(e).splitlines()[0][:200]})") from e

    def apply(self, payload: torch.Tensor) -> None:
        for p, g in zip(self.params, self.update_grads):
            p.grad = g
        self.optimizer.step()
        self.scheduler.step()
        if self.nb:
            self._load_buffers(payload[self.d:self.d + self.nb])

    # ------------------------------------------------------------------ checks and evaluation

    def poll_status(self) -> float:
        """The status of a recent payload, the same step's on every rank.

        On CPU that is the step just taken. On CUDA, reading it would stall the queue every
        step, so the status is copied without blocking and read one step later.
        """
        if self.device.type != "cuda":
            return float(self.payload[-1])
        slot = self.step % 2
        self._status_host[slot].copy_(self.payload[-1:], non_blocking=True)
        self._status_ready[slot].record()
        if self.step < 2:
            return 0.0
        self._status_ready[1 - slot].synchronize()
        return float(self._status_host[1 - slot])

    def check_finite(self) -> None:
        bad = int(self.first_bad_step)
        if bad >= 0:
            raise aggregators.NonFiniteError(
                f"the aggregate at step {bad} was not finite (rule {self.cfg.aggregator.name} cannot "
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
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        bs = self.cfg.train.eval_batch_size
        for start in range(lo, hi, bs):
            end = min(start + bs, hi)
            logits = self.model(x[start:end])
            sums[0] += (logits.argmax(1) == y[start:end]).sum()
            sums[1] += F.cross_entropy(logits, y[start:end], reduction="sum").double()
            sums[2] += end - start
        self.exchange.all_reduce_sum(sums)
        correct, loss, count = sums.tolist()
        self.model.train()
        return {"test_accuracy": correct / count, "test_loss": loss / count}

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
        self.selection_counts.copy_(state["selection_counts"])
        self.first_bad_step.fill_(state["first_bad_step"])
        self.history = list(state["history"])
        self.wall_seconds = state["wall_seconds"]

    # ------------------------------------------------------------------ the loop

    def request_stop(self, signum, _frame=None) -> None:
        self.stop_signal = signum

    def fit(self, log) -> dict:
        cfg, t = self.cfg, self.cfg.train
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self.request_stop)
        log.start(self)
        started = time.perf_counter() - self.wall_seconds   # training time, not set-up
        while self.step < t.steps:
            self.guarded_step()
            status = self.poll_status()
            step = self.step
            log.tick(step)
            if status == STATUS_NONFINITE:
                self.check_finite()
            if t.check_every and step % t.check_every == 0 and not self.replicas_agree():
                raise RuntimeError(f"replicas differ after step {step}: the ranks' models drifted apart; "
                                   f"this is a bug in the harness or a non-deterministic kernel")
            if step % t.eval_every == 0 or step == t.steps:
                self.wall_seconds = time.perf_counter() - started
                record = {"step": step, **self.evaluate(), "train_loss": float(self.payload[-2]),
                          "lr": self.optimizer.param_groups[0]["lr"], "wall_seconds": self.wall_seconds}
                self.history.append(record)
                log.metrics(record)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or status == STATUS_STOP:
                self.wall_seconds = time.perf_counter() - started
                checkpoint.save(self, log.run_dir, keep=t.keep_checkpoints)
            if status == STATUS_STOP:
                raise StopRequested(step, int(self.stop_signal) or signal.SIGTERM)
        self.check_finite()
        self.wall_seconds = time.perf_counter() - started
        return self.summary()

    def summary(self) -> dict:
        acc = [h["test_accuracy"] for h in self.history]
        counts = self.selection_counts.tolist() if self.aggregator.selected is not None or \
            any(self.selection_counts.tolist()) else None
        return {
            "final_test_accuracy": acc[-1] if acc else None,
            "final_test_accuracy_last5": sum(acc[-5:]) / len(acc[-5:]) if acc else None,
            "best_test_accuracy": max(acc) if acc else None,
            "final_test_loss": self.history[-1]["test_loss"] if self.history else None,
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
        }
