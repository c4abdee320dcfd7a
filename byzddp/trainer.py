"""The training loop: every rank's workers' rows -> the server (pre-aggregation + robust rule)
-> the same update on every replica. Replaces DDP's mean all-reduce.

A step, as `Trainer.train_step` reads: the worker side (byzddp/client.py) fills this rank's rows,
one per hosted worker; the Byzantine workers' attack forges theirs; the exchange
(byzddp/exchange.py) gathers every row to rank 0, where the server side (byzddp/server.py) runs
the pre-aggregation and the rule and writes the payload, which is broadcast and applied by every
rank's optimizer. Under train.exchange=sharded every rank aggregates a column slice instead
(byzddp/sharded.py). byzddp/layout.py names the rows' and the payload's columns (RowLayout) and
the payload's status codes (Status): OK, NONFINITE when the aggregate was not finite (the update
is then not applied and the run stops at the next check with the step named), STOP when a rank
asked to stop (a signal): all ranks then checkpoint at the same step and exit.

A round is one step of the server; with workers.participation < 1 only the round's drawn workers
(byzddp/rounds.py) compute and send, and the rule sees their rows alone. The loop owns the
replica's optimizer and schedule, the attack's state, the history and the checkpoints; the
worker side and the server side each own their part of the checkpoint.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from byzddp import attacks, checkpoint, config, data, models, pipeline, rounds, sharded, trigger
from byzddp.attacks import AttackContext
from byzddp.client import Client, RoundDropped
from byzddp.distributed import Topology
from byzddp.exchange import Exchange
from byzddp.layout import RowLayout, Status
from byzddp.replica import Replica
from byzddp.server import Server


class CollectiveError(RuntimeError):
    """A collective of the step failed or timed out: some rank is stuck or gone."""


class StopRequested(Exception):
    """A signal asked the run to stop; a checkpoint was written."""

    def __init__(self, step: int, signum: int, dropped: bool = False):
        how = (f"during round {step + 1}, whose partial local steps were dropped; checkpoint written at step {step}"
               if dropped else f"after step {step}; checkpoint written")
        super().__init__(f"stopped by signal {signum} {how}")
        self.step, self.signum = step, signum


class Trainer:
    def __init__(self, cfg, topo: Topology, run_dir=None):
        self.cfg, self.topo, self.run_dir = cfg, topo, run_dir
        self.device = topo.device
        self.n = cfg.workers.n
        self.f_declared = cfg.workers.byzantine

        self.ds = data.load(cfg).to(self.device)
        self.attack = attacks.from_config(cfg)
        self.attack.prepare(self.ds.train_x, self.ds.num_classes)
        self.data = data.WorkerData(self.ds, cfg, attacks.whole_set_samplers(cfg))
        # The attack success rate, wherever the trigger can be stamped (clean runs too: the baseline).
        a = cfg.attack
        self.trigger = None
        if trigger.problem(self.ds.train_x.shape[1:], a.trigger_size, a.target_class, self.ds.num_classes) is None:
            self.trigger = trigger.Trigger.for_data(self.ds.train_x, self.ds.num_classes, a.trigger_size,
                                                    a.target_class)

        self.model = models.build(cfg, tuple(self.ds.train_x.shape[1:]), self.ds.num_classes).to(self.device)
        self.replica = Replica(self.model)
        self.d = self.replica.d
        self.layout = RowLayout(self.d, self.replica.nb)
        self.exchange = Exchange(topo)
        self.client = Client(cfg, self.replica, self.data, self.attack, list(topo.workers), topo.block,
                             self.ds.train_x, self._note, self._any_rank_dropped)
        self.notes = self.client.notes

        t = cfg.train
        self.optimizer = torch.optim.SGD(self.replica.params, lr=t.lr, momentum=t.momentum,
                                         weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.server = Server(cfg, self.replica, self.ds.train_x, self.ds.train_y)
        self.payload = self.server.payload      # what the server broadcasts and every rank applies
        self.update_grads = self.replica.views(self.payload[self.layout.update])
        # Attacks that model the server get their own copy of the pipeline: searching it must not
        # move the server's state (cclip's centre). Attacks that learn from history get the
        # previous step's update, the same on every rank and kept in checkpoints.
        self.attack_pipeline = pipeline.build(cfg) if self.attack.needs_pipeline else None
        self.previous_update: Optional[torch.Tensor] = None
        # train.exchange=sharded: every rank aggregates a column slice (byzddp/sharded.py).
        self.sharded = sharded.ShardedServer(self.server, self.exchange, topo) if t.exchange == "sharded" else None

        self.step = 0
        self.history: List[dict] = []
        self.wall_seconds = 0.0
        if self.device.type == "cuda":
            self._status_host = torch.zeros(2, 1, pin_memory=True)
            self._status_ready = [torch.cuda.Event(), torch.cuda.Event()]

    def _note(self, line: str) -> None:
        if self.topo.is_server:
            print(f"byzddp: {line}", file=sys.stderr, flush=True)

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        if t.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step, t.steps) / t.steps))
        if t.lr_schedule == "step":
            return t.lr_decay ** sum(step >= s for s in t.lr_decay_steps)
        return 1.0

    def _any_rank_dropped(self, mine: bool) -> bool:
        """Whether a stop signal cut the round short on any rank (every rank calls it)."""
        if self.topo.world == 1:
            return mine
        flag = torch.tensor([float(mine)], device=self.device)
        return bool(self.exchange.all_reduce_max(flag))

    # ------------------------------------------------------------------ the step

    def train_step(self) -> None:
        """One round: rows from the worker side, the attack, the server's payload, the update."""
        step = self.step
        participants = rounds.participants(self.cfg, step)
        everyone = len(participants) == self.n
        byzantine = [w for w in attacks.byzantine_set(self.cfg, step) if everyone or w in participants]
        rows, diagnose = self.client.rows, self.diagnosed(step)
        self.client.compute_rows(step, byzantine, None if everyone else participants,
                                 lr=self.optimizer.param_groups[0]["lr"])
        ctx = AttackContext(step, self.cfg.seed, rows[:, self.layout.vector], self.topo.workers, byzantine,
                            self.exchange, len(participants), self.f_declared, self.attack_pipeline,
                            self.previous_update, None if everyone else participants)
        self.attack.forge(ctx)
        if self.sharded is not None:   # all_to_all, the rule per slice, all_gather of the update
            self.sharded.step(rows, step, byzantine, participants, diagnose)
        else:                          # gather to rank 0, the rule, broadcast
            gathered = self.exchange.gather(rows)
            if self.topo.is_server:
                self.server.aggregate(gathered, step, byzantine, participants, diagnose)
            self.exchange.broadcast(self.payload)
        if self.attack.needs_previous:
            self.previous_update = self.payload[self.layout.update].clone()
        self.apply(self.payload)
        self.step += 1

    def diagnosed(self, step: int) -> bool:
        """Whether round `step` gets the server's diagnostics: every log.diagnostics_every rounds, or
        (0, the default) the rounds that end at an evaluation."""
        t, every = self.cfg.train, self.cfg.log.diagnostics_every
        done = step + 1
        return done % every == 0 if every else done % t.eval_every == 0 or done == t.steps

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
        for p, g in zip(self.replica.params, self.update_grads):
            p.grad = g
        self.optimizer.step()
        self.scheduler.step()
        if self.replica.nb:
            self.replica.load_buffers(payload[self.layout.buffers])

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

    def replicas_agree(self) -> bool:
        return self.exchange.all_agree(self.replica.checksum())

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
        return self.replica.sha256()

    # ------------------------------------------------------------------ checkpointable

    def state_dict(self) -> dict:
        """Everything the run's future depends on: the loop's, the worker side's and the server
        side's parts. Collective: call on every rank."""
        return {
            "config_hash": config.config_hash(self.cfg),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **self.client.state_dict(self.exchange),
            **self.server.state_dict(),
            "attack": self.attack.state_dict(),
            "previous_update": self.previous_update,
            "history": list(self.history),
            "wall_seconds": self.wall_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.client.load_state_dict(state)
        self.server.load_state_dict(state)
        self.attack.load_state_dict(state["attack"])
        previous = state["previous_update"]
        self.previous_update = None if previous is None else previous.to(self.device)
        self.history = list(state["history"])
        self.wall_seconds = state["wall_seconds"]

    # ------------------------------------------------------------------ the loop

    def request_stop(self, signum, _frame=None) -> None:
        """A signal handler: stop after this step (between two local steps in a long round), then
        checkpoint; a second Ctrl-C exits at once."""
        if self.client.stop_signal and signum == signal.SIGINT:
            if self.topo.is_server:
                os.write(2, b"byzddp: interrupted again: exiting now, without a checkpoint of this round\n")
            os._exit(128 + signal.SIGINT)
        if not self.client.stop_signal and self.topo.is_server:
            when = "between two local steps" if self.client.local_steps > 1 else "after this step"
            os.write(2, f"byzddp: signal {signum}: stopping {when}, then a checkpoint "
                        f"(Ctrl-C again exits at once, without one)\n".encode())
        self.client.stop_signal = signum

    def fit(self, log) -> dict:
        t = self.cfg.train
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        log.start(self)
        for line in self.notes:
            self._note(line)
        started = time.perf_counter() - self.wall_seconds   # training time, not set-up
        while self.step < t.steps:
            try:
                self.guarded_step()
            except RoundDropped:      # every rank dropped the round: the checkpoint holds the last whole one
                self.wall_seconds = time.perf_counter() - started
                checkpoint.save(self, log.run_dir, keep=t.keep_checkpoints)
                raise StopRequested(self.step, int(self.client.stop_signal) or signal.SIGTERM, dropped=True)
            status = self.poll_status()
            step = self.step
            log.tick(step)
            if status == Status.NONFINITE:
                self.server.check_finite()
            if t.check_every and step % t.check_every == 0 and not self.replicas_agree():
                raise RuntimeError(f"replicas differ after step {step}: the ranks' models drifted apart; "
                                   f"this is a bug in the harness or a non-deterministic kernel")
            if step % t.eval_every == 0 or step == t.steps:
                self.wall_seconds = time.perf_counter() - started
                record = {"step": step, **self.evaluate(), "train_loss": float(self.payload[self.layout.train_loss]),
                          "lr": self.optimizer.param_groups[0]["lr"], "wall_seconds": self.wall_seconds,
                          **self.server.diagnosed.since_last()}
                self.history.append(record)
                log.metrics(record)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or status == Status.STOP:
                self.wall_seconds = time.perf_counter() - started
                checkpoint.save(self, log.run_dir, keep=t.keep_checkpoints)
            if status == Status.STOP:
                raise StopRequested(step, int(self.client.stop_signal) or signal.SIGTERM)
        self.server.check_finite()
        self.wall_seconds = time.perf_counter() - started
        return self.summary()

    def summary(self) -> dict:
        acc = [h["test_accuracy"] for h in self.history]
        asr = [h["attack_success_rate"] for h in self.history if "attack_success_rate" in h]
        counts = self.server.selection_counts.tolist()
        counts = counts if self.server.aggregator.selected is not None or any(counts) else None
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
            "local_steps": self.client.local_steps,
            "workers_per_round": rounds.workers_per_round(self.cfg),
            **self.server.diagnosed.run_means(),
        }
