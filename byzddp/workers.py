"""The hosted workers' gradients, many at once: `torch.func` (functional_call, grad, vmap) over
fixed-size chunks of workers, written into the rank's rows.

Why fixed-size chunks. A run must give bit-identical models for any number of ranks, so the
shapes the kernels see must not depend on how workers map to ranks. Every chunk holds exactly
`chunk` workers, a function of the config alone (never of the rank's block); the last chunk
of a rank is padded with repeats of its first worker, whose results are discarded. A worker's
gradient is then the same bits whatever chunk, position or rank it lands in (tested).

Dropout. The loop seeds each worker's forward with key("dropout", seed, worker, step). Here
every dropout module's forward is swapped, for the vmapped call only, for a multiplication by a
mask drawn beforehand from that worker's own generator with the same key, in the same order,
shape and kernel (bernoulli_, then divide by 1 - p) as ATen's dropout on the CPU. So a worker's
mask does not depend on its chunk, and on the CPU it equals the loop's. nn.Dropout and the
feature dropouts (nn.Dropout1d/2d/3d: one draw per channel) are handled.

BatchNorm. Each worker gets its own copy of the replica's buffers (batched along the chunk);
the forward computes per-worker batch statistics and updates that worker's copy in place, as
the loop's forward on a fresh replica does. The model's own buffers are never touched.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from byzddp import streams

# Bytes of chunk workspace the automatic chunk size aims at (per device type, never per
# machine or per rank: the chunk must be the same on every rank of a run).
# On the CPU a large workspace loses to page faults and cache misses (measured: the cnn runs
# fastest two workers at a time, the mlp about 32). Also on the CPU, one stacked gradient
# tensor above glibc's largest mmap threshold (32 MiB) is mapped afresh, and page-faulted,
# at every chunk: the mlp's first layer for 64 workers ran slower than the loop.
CHUNK_BUDGET = {"cpu": 96 << 20, "cuda": 4 << 30}
CPU_LARGEST_TENSOR = 32 << 20
# On the CPU, torch.func's batched kernels lose to the loop when the budget leaves only a few
# workers a chunk (measured, one thread: the cnn at its chunk of 2 takes 1.2-1.4x the loop's
# time): there each worker's own compute dwarfs the per-worker overhead that vectorizing saves.
CPU_MIN_CHUNK = 4
FEATURE_DROPOUT = {nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5}   # batched input dims


def feature_noise_shape(kind: type, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The shape of the noise ATen's feature dropout draws for an input of `shape`: one value
    per (sample, channel). dropout2d takes any input as batched (a 2-d input gets elementwise
    noise); dropout1d/3d add a batch dimension to an unbatched input (one value per channel)."""
    if kind is nn.Dropout2d or len(shape) == FEATURE_DROPOUT[kind]:
        return tuple(shape[:2]) + (1,) * (len(shape) - 2)
    return tuple(shape[:1]) + (1,) * (len(shape) - 1)


@dataclass
class Job:
    """One worker's gradient to compute: its row, its id (keys its dropout) and its batch."""
    row: int
    worker: int
    x: torch.Tensor
    y: torch.Tensor


@dataclass
class DropoutCall:
    module: nn.Module
    shape: Tuple[int, ...]      # the noise's shape for one worker's batch
    p: float


class Unsupported(Exception):
    """The model cannot be vectorized; the message is the one-line reason."""


def probe(model: nn.Module, x: torch.Tensor) -> Tuple[List[DropoutCall], int]:
    """One eval-mode forward on `x` (a batch of the run's shape): the dropout calls in order,
    and the activations' element count (sizes the chunk). Draws no randomness."""
    calls: List[DropoutCall] = []
    activations = [0]
    hooks = []

    def on_dropout(module, args):
        inp = args[0]
        if type(module) in FEATURE_DROPOUT:
            shape = feature_noise_shape(type(module), tuple(inp.shape))
        else:
            shape = tuple(inp.shape)
        calls.append(DropoutCall(module, shape, float(module.p)))

    def on_output(module, args, out):
        if isinstance(out, torch.Tensor):
            activations[0] += out.numel()

    for m in model.modules():
        if isinstance(m, (nn.AlphaDropout, nn.FeatureAlphaDropout)):
            raise Unsupported(f"{type(m).__name__} is not supported by the vectorized path")
        if type(m) is nn.Dropout or type(m) in FEATURE_DROPOUT:
            hooks.append(m.register_forward_pre_hook(on_dropout))
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            raise Unsupported(f"{type(m).__name__} is not supported by the vectorized path")
        if not list(m.children()):
            hooks.append(m.register_forward_hook(on_output))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return calls, activations[0]


def auto_chunk(n: int, d: int, nb: int, activations: int, device_type: str, largest: int = 0) -> int:
    """Workers per chunk: all n unless their workspace passes the budget, then the n workers
    cut into the fewest equal chunks that fit (so one rank pads little). Per worker: its
    gradient twice (vmap's output and the row), its buffers, and the forward's activations
    about three times (kept for backward, their gradients, temporaries); float32. `largest`:
    the largest parameter's size, bounded on the CPU by CPU_LARGEST_TENSOR per chunk."""
    per_worker = 4 * (2 * d + 2 * nb + 3 * activations)
    budget = CHUNK_BUDGET.get(device_type, CHUNK_BUDGET["cuda"])
    cap = max(1, min(n, budget // max(per_worker, 1)))
    if device_type == "cpu" and largest:
        cap = max(1, min(cap, CPU_LARGEST_TENSOR // (4 * largest)))
    return -(-n // -(-n // cap))


def auto_chunk_pays(n: int, chunk: int, device_type: str) -> bool:
    """Whether an automatic chunk of `chunk` of the n workers is worth vectorizing: always off
    the CPU; on the CPU only when it holds at least CPU_MIN_CHUNK workers (or all n)."""
    return device_type != "cpu" or chunk >= min(n, CPU_MIN_CHUNK)


class VectorizedWorkers:
    """Gradients, losses and BatchNorm buffers of many workers of one model, chunk by chunk."""

    def __init__(self, model: nn.Module, chunk: int, seed: int, sample: torch.Tensor):
        self.model, self.chunk, self.seed = model, chunk, seed
        self.dropout, self.activations = probe(model, sample)
        self.names = [k for k, _ in model.named_parameters()]
        self.buffer_names = [k for k, _ in model.named_buffers()]

        def loss_of(params, buffers, x, y, masks):
            with self._masked_dropout(masks):
                out = torch.func.functional_call(model, (params, buffers), (x,))
            loss = F.cross_entropy(out, y)
            return loss, (loss, buffers)

        self.grads = torch.func.vmap(torch.func.grad(loss_of, has_aux=True),
                                     in_dims=(None, 0, 0, 0, 0), randomness="error")
        # Local steps (train.local_steps > 1): every worker at its own parameters.
        self.grads_at_own = torch.func.vmap(torch.func.grad(loss_of, has_aux=True),
                                            in_dims=(0, 0, 0, 0, 0), randomness="error")

    def automatic_chunk(self, n: int, device_type: str) -> int:
        """auto_chunk for n workers of this model on `device_type`."""
        params = [p.numel() for p in self.model.parameters()]
        buffers = sum(b.numel() for b in self.model.buffers())
        return auto_chunk(n, sum(params), buffers, self.activations, device_type, max(params))

    # ------------------------------------------------------------------ dropout

    @contextlib.contextmanager
    def _masked_dropout(self, masks: Sequence[torch.Tensor]):
        """Every dropout call multiplies by the next of `masks` (one per recorded call)."""
        if not self.dropout:
            yield
            return
        queue = list(masks)

        def masked(inp):
            return inp * queue.pop(0)

        modules = {id(c.module): c.module for c in self.dropout}.values()
        try:
            for m in modules:
                m.forward = masked
            yield
        finally:
            for m in modules:
                del m.forward

    def _worker_masks(self, worker: int, step: int, device) -> List[torch.Tensor]:
        """This worker's dropout masks at `step`, drawn as ATen's CPU dropout draws them."""
        g = torch.Generator(device=device)
        g.manual_seed(streams.key("dropout", self.seed, worker, step))
        out = []
        for c in self.dropout:
            if c.p == 0:
                out.append(torch.ones(c.shape, device=device))
            elif c.p == 1:
                out.append(torch.zeros(c.shape, device=device))
            else:
                noise = torch.empty(c.shape, device=device).bernoulli_(1 - c.p, generator=g)
                out.append(noise.div_(1 - c.p))
        return out

    # ------------------------------------------------------------------ the gradients

    def _rows_as(self, flat: torch.Tensor, index: torch.Tensor, named) -> dict:
        """Rows `index` of `flat` (one flat vector per row) as a batched dict of `named`'s
        tensors' shapes and dtypes."""
        picked = flat.index_select(0, index)
        out, offset = {}, 0
        for name, t in named:
            # contiguous: BatchNorm's in-place update of a strided view of `picked` would be lost
            out[name] = picked[:, offset:offset + t.numel()].reshape(len(index), *t.shape).to(t.dtype).contiguous()
            offset += t.numel()
        return out

    @torch.no_grad()
    def compute(self, jobs: List[Job], step: int, vectors: torch.Tensor, buffers: Optional[torch.Tensor],
                losses: torch.Tensor, own_params: Optional[torch.Tensor] = None,
                own_buffers: Optional[torch.Tensor] = None) -> None:
        """For each job, its gradient into vectors[job.row], its buffers after the forward into
        buffers[job.row] (when the model has any) and its batch loss into losses[job.row].

        Local steps: `own_params` (rows of flat parameters, indexed by job.row) puts each worker
        at its own parameters instead of the replica's, and `own_buffers` (likewise) gives each
        its own BatchNorm buffers to start from."""
        model = self.model
        params = {k: p.detach() for k, p in model.named_parameters()}
        replica = {k: b.detach() for k, b in model.named_buffers()}
        c = self.chunk
        for start in range(0, len(jobs), c):
            part = jobs[start:start + c]
            k = len(part)
            pad = [0] * (c - k)             # fixed shapes: pad with repeats of the first worker
            x = torch.stack([j.x for j in part] + [part[i].x for i in pad])
            y = torch.stack([j.y for j in part] + [part[i].y for i in pad])
            masks = []
            if self.dropout:
                drawn = [self._worker_masks(j.worker, step, x.device) for j in part]
                masks = [torch.stack(m) for m in zip(*drawn, *[drawn[i] for i in pad])]
            padded = torch.tensor([j.row for j in part] + [part[i].row for i in pad], device=vectors.device)
            if own_buffers is not None and replica:
                own = self._rows_as(own_buffers, padded, replica.items())
            else:
                own = {name: b.unsqueeze(0).expand(c, *b.shape).clone() for name, b in replica.items()}
            with torch.enable_grad():
                if own_params is None:
                    g, (loss, after) = self.grads(params, own, x, y, masks)
                else:
                    at = self._rows_as(own_params, padded, params.items())
                    g, (loss, after) = self.grads_at_own(at, own, x, y, masks)
            rows = [j.row for j in part]
            if rows == list(range(rows[0], rows[0] + k)):
                def put(dst, src, lo=rows[0]):
                    dst[lo:lo + k].copy_(src)
            else:   # some rows skipped (Byzantine workers that need no gradient)
                index = torch.tensor(rows, device=vectors.device)

                def put(dst, src):
                    dst.index_copy_(0, index, src.to(dst.dtype))
            offset = 0
            for name in self.names:
                flat = g[name][:k].reshape(k, -1)
                put(vectors[:, offset:offset + flat.shape[1]], flat)
                offset += flat.shape[1]
            if buffers is not None and self.buffer_names:
                put(buffers, torch.cat([after[name][:k].reshape(k, -1).to(buffers.dtype)
                                        for name in self.buffer_names], 1))
            put(losses, loss[:k])
