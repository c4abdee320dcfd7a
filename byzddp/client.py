"""The worker side of a step (ByzFL's and Flower's client): the model replica and each hosted
worker's shard in, one row per hosted worker out.

A rank hosts a contiguous block of the logical workers. `Client.compute_rows` fills the rank's
(block, width) rows, laid out by byzddp/layout.py: [vector | BatchNorm buffers | loss | stop].
Honest workers (and Byzantine ones whose attack needs an honest-looking gradient) compute their
gradient on their own batch; the attack forges the Byzantine rows afterwards, in the loop.

The gradients are computed together, chunk by chunk, with torch.func (byzddp/workers.py), or one
by one with workers.vectorize=false (or where vectorizing does not pay); both write the same
rows.

Local rounds. With train.local_steps=K > 1 a worker takes K local SGD steps from the global
model at the round's learning rate on its own batches (local step k of round t reads the batch,
dropout mask and augmentation of index t K + k) and sends its pseudo-gradient
(global - local) / (lr K), computed as the mean of its K gradients (the same in exact
arithmetic, and for K = 1 the gradient itself, bit for bit). A stop signal is honoured between
two local steps: the round is dropped whole (`RoundDropped`), so a checkpoint holds the last
whole round.

Worker momentum (m <- beta m + g) acts on what is sent, as for K = 1; it is this side's state.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from byzddp import streams, workers
from byzddp.layout import RowLayout
from byzddp.replica import Replica


class RoundDropped(Exception):
    """A stop signal came between two local steps: this rank's round is incomplete."""


class Client:
    def __init__(self, cfg, replica: Replica, worker_data, attack, hosted: List[int], block: int,
                 sample_x: torch.Tensor, note: Callable[[str], None],
                 any_rank_dropped: Callable[[bool], bool] = lambda mine: mine):
        self.cfg, self.replica, self.data, self.attack = cfg, replica, worker_data, attack
        self.hosted = hosted            # the logical workers this rank hosts, in order
        self.device = replica.device
        self.local_steps = cfg.train.local_steps
        self.layout = L = RowLayout(replica.d, replica.nb)
        self.rows = torch.zeros(block, L.width, device=self.device)
        # Each worker's gradient lands straight in its row.
        self.row_grads = [replica.views(self.rows[i, L.vector]) for i in range(block)]
        self._note = note
        self._any_rank_dropped = any_rank_dropped   # a collective: every rank's word on a dropped round
        self.notes: List[str] = []      # one-line facts for the start of the log
        self._vectorized_ran = False
        self.vectorized = self._build_vectorized(sample_x)
        beta = cfg.workers.momentum
        self.momentum = torch.zeros(block, replica.d, device=self.device) if beta > 0 else None
        self.stop_signal = 0            # set by the loop's signal handler

    def _build_vectorized(self, sample_x: torch.Tensor) -> Optional[workers.VectorizedWorkers]:
        """The vectorized workers of workers.vectorize, or None (the loop) with the reason noted."""
        w = self.cfg.workers
        if not w.vectorize:
            self.notes.append("workers computed one by one (workers.vectorize=false)")
            return None
        sample = torch.zeros(self.cfg.train.batch_size, *sample_x.shape[1:], device=self.device)
        try:
            vec = workers.VectorizedWorkers(self.replica.model, 1, self.cfg.seed, sample)
        except workers.Unsupported as e:
            self.notes.append(f"workers computed one by one: {e}")
            return None
        vec.chunk = w.chunk or vec.automatic_chunk(w.n, self.device.type)
        if not w.chunk and not workers.auto_chunk_pays(w.n, vec.chunk, self.device.type):
            self.notes.append(f"workers computed one by one: on the CPU this model's activations leave "
                              f"{vec.chunk} worker{'s' * (vec.chunk > 1)} a vectorized chunk, where the loop "
                              f"is faster (workers.chunk forces vectorizing)")
            return None
        how = "workers.chunk" if w.chunk else "auto, workers.chunk sets it"
        self.notes.append(f"workers vectorized with torch.func in chunks of {vec.chunk} ({how})")
        return vec

    # ------------------------------------------------------------------ a round's rows

    def batch(self, worker: int, t: int, byzantine: bool):
        """Worker's batch at local step index t (a Byzantine worker's, as its attack makes it)."""
        x, y = self.data.batch_of(worker, t)
        if byzantine:
            x, y = self.attack.poison(x, y, self.data.ds.num_classes)
        return x, y

    def compute_rows(self, step: int, byzantine: List[int], participants: Optional[List[int]] = None,
                     lr: Optional[float] = None) -> None:
        """Fill this rank's rows: each hosted worker's vector, buffers and loss (the round's
        participants only; the others' rows stay zero). `lr`: the round's learning rate, for
        local steps. Raises RoundDropped when a stop signal cut a local round short."""
        if self.local_steps > 1 and lr is None:
            raise TypeError("compute_rows: local steps need the round's learning rate (lr=...)")
        L = self.layout
        self.replica.model.train()
        jobs = []
        for i, w in enumerate(self.hosted):
            is_byzantine = w in byzantine
            if (is_byzantine and not self.attack.needs_gradient) or (participants is not None and w not in participants):
                continue
            jobs.append((i, w, is_byzantine))
        if self.vectorized is not None and len(jobs) == len(self.hosted):
            self.rows[len(jobs):].zero_()       # every hosted row gets overwritten: zero the padding
        else:
            self.rows.zero_()                   # the loop's backward accumulates into the rows
        if jobs and self.local_steps == 1:
            self.gradients([workers.Job(i, w, *self.batch(w, step, b)) for i, w, b in jobs], step)
        elif self.local_steps > 1:
            # A round dropped on one rank is dropped on all, before any state moves (momentum here,
            # the attack's and the server's in the loop), so that a checkpoint resumes it exactly.
            dropped = False
            try:
                if jobs:
                    self.local_rounds(jobs, step, lr)
            except RoundDropped:
                dropped = True
            if self._any_rank_dropped(dropped):
                raise RoundDropped()
        if self.momentum is not None and jobs:
            self._add_momentum([i for i, _, _ in jobs])
        self.rows[:len(self.hosted), L.stop] = float(self.stop_signal)

    def _add_momentum(self, rows: List[int]) -> None:
        """m <- beta m + g for the workers that computed a gradient, and m is what they send;
        elementwise, so the bits are those of one worker at a time."""
        L, beta, k = self.layout, self.cfg.workers.momentum, len(rows)
        if rows == list(range(k)):
            m = self.momentum[:k]
            m.mul_(beta).add_(self.rows[:k, L.vector])
            self.rows[:k, L.vector].copy_(m)
        else:
            index = torch.tensor(rows, device=self.device)
            m = self.momentum.index_select(0, index).mul_(beta).add_(self.rows[:, L.vector].index_select(0, index))
            self.momentum.index_copy_(0, index, m)
            self.rows[:, L.vector].index_copy_(0, index, m)

    def _vectorized(self, compute) -> bool:
        """Run `compute` on the vectorized workers; False when there are none, or when its first
        call fails on a model torch.func cannot take (then the loop from now on, said once)."""
        if self.vectorized is None:
            return False
        try:
            compute()
        except (torch.cuda.OutOfMemoryError, RoundDropped):
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
        L, R = self.layout, self.replica
        tried = self.vectorized is not None
        if self._vectorized(lambda: self.vectorized.compute(
                jobs, step, self.rows[:, L.vector], self.rows[:, L.buffers] if R.nb else None,
                self.rows[:, L.loss])):
            return
        if tried:   # a failed first vectorized call may have written rows; backward accumulates into them
            self.rows.zero_()
        replica_buffers = R.flat_buffers() if R.nb else None
        for job in jobs:
            i = job.row
            if R.has_dropout:
                torch.manual_seed(streams.key("dropout", self.cfg.seed, job.worker, step))
            for p, g in zip(R.params, self.row_grads[i]):
                p.grad = g
            loss = F.cross_entropy(R.model(job.x), job.y)
            loss.backward()
            if R.nb:
                self.rows[i, L.buffers] = R.flat_buffers()
                R.load_buffers(replica_buffers)
            self.rows[i, L.loss] = loss.detach()

    def _check_stop(self) -> None:
        if self.stop_signal:
            raise RoundDropped()

    def local_rounds(self, jobs: List[tuple], step: int, lr: float) -> None:
        """train.local_steps = K > 1: each (row, worker, byzantine) job's K local SGD steps from
        the global model; its row gets the mean of its K gradients, its BatchNorm buffers after
        the last step and its mean loss over the K steps. The replica is left as it was."""
        L, R, K = self.layout, self.replica, self.local_steps
        rows = torch.tensor([i for i, _, _ in jobs], device=self.device)
        start = R.flat_params()
        replica_buffers = R.flat_buffers() if R.nb else None
        total = torch.zeros(len(jobs), R.d, device=self.device)
        losses = torch.zeros(len(jobs), device=self.device)
        if self._vectorized(lambda: self._vectorized_local_steps(jobs, step, lr, replica_buffers, total, losses,
                                                                 rows)):
            return
        total.zero_()
        losses.zero_()
        grad = torch.zeros(R.d, device=self.device)
        views = R.views(grad)
        try:
            for j, (i, w, byzantine) in enumerate(jobs):
                for k in range(K):
                    self._check_stop()
                    t = step * K + k
                    x, y = self.batch(w, t, byzantine)
                    if R.has_dropout:
                        torch.manual_seed(streams.key("dropout", self.cfg.seed, w, t))
                    grad.zero_()
                    for p, g in zip(R.params, views):
                        p.grad = g
                    loss = F.cross_entropy(R.model(x), y)
                    loss.backward()
                    total[j] += grad
                    losses[j] += loss.detach()
                    with torch.no_grad():
                        for p, g in zip(R.params, views):
                            p.add_(g, alpha=-lr)
                if R.nb:
                    self.rows[i, L.buffers] = R.flat_buffers()
                    R.load_buffers(replica_buffers)
                R.load_params(start)
        except RoundDropped:
            R.load_params(start)        # the replica as the round found it
            if R.nb:
                R.load_buffers(replica_buffers)
            raise
        self.rows[:, L.vector].index_copy_(0, rows, total / K)
        self.rows[:, L.loss].index_copy_(0, rows, losses / K)

    def _vectorized_local_steps(self, jobs, step, lr, replica_buffers, total, losses, rows) -> None:
        """local_rounds on torch.func: every worker at its own parameters, chunk by chunk."""
        L, R, K = self.layout, self.replica, self.local_steps
        own = R.flat_params().expand(len(jobs), R.d).clone()
        buffers = replica_buffers.expand(len(jobs), R.nb).clone() if R.nb else None
        grad = torch.empty(len(jobs), R.d, device=self.device)
        loss = torch.empty(len(jobs), device=self.device)
        for k in range(K):
            self._check_stop()
            t = step * K + k
            part = [workers.Job(j, w, *self.batch(w, t, b)) for j, (_, w, b) in enumerate(jobs)]
            after = torch.empty_like(buffers) if R.nb else None
            if k == 0:      # every worker at the global model: shared weights, the cheaper vmap
                self.vectorized.compute(part, t, grad, after, loss)
            else:
                self.vectorized.compute(part, t, grad, after, loss, own_params=own, own_buffers=buffers)
            total += grad
            losses += loss
            own.add_(grad, alpha=-lr)
            buffers = after
        if R.nb:
            self.rows[:, L.buffers].index_copy_(0, rows, buffers)
        self.rows[:, L.vector].index_copy_(0, rows, total / K)
        self.rows[:, L.loss].index_copy_(0, rows, losses / K)

    # ------------------------------------------------------------------ checkpointable

    def state_dict(self, exchange) -> dict:
        """Every worker's momentum, gathered in worker order. Collective: call on every rank."""
        return {"worker_momentum": None if self.momentum is None else exchange.gather(self.momentum)}

    def load_state_dict(self, state: dict) -> None:
        if self.momentum is not None:
            mine = state["worker_momentum"][self.hosted[0]:self.hosted[-1] + 1]
            self.momentum[:len(self.hosted)].copy_(mine)
