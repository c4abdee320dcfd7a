"""Harness step (gather -> mean -> broadcast) against a plain DDP all-reduce step.

Same model, world size and per-worker batch, one worker per rank, in one run:

    torchrun --nproc_per_node=4 bench/step_overhead.py --model cnn
    torchrun --nproc_per_node=4 bench/step_overhead.py --model resnet20

Both sides train on the same synthetic tensors of the dataset's shape (no download needed),
so what differs is only the step: the harness's per-worker backward into a flat row, gather
to rank 0, the rule, broadcast, and the optimizer step; against DDP's bucketed all-reduce
overlapped with backward. Prints milliseconds per step (median) and the ratio harness / DDP.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from byzddp import config, data, distributed  # noqa: E402
from byzddp.trainer import Trainer  # noqa: E402

SHAPES = {"cnn": ("mnist", (1, 28, 28)), "mlp": ("mnist", (1, 28, 28)), "resnet20": ("cifar10", (3, 32, 32))}


def synthetic(shape, n_train=2048, n_test=256) -> data.Dataset:
    g = torch.Generator().manual_seed(0)
    return data.Dataset(torch.randn(n_train, *shape, generator=g), torch.randint(0, 10, (n_train,), generator=g),
                        torch.randn(n_test, *shape, generator=g), torch.randint(0, 10, (n_test,), generator=g), 10)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    # the slowest rank sets the pace of a synchronous step
    t = torch.tensor(out, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t.tolist()) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    dataset, shape = SHAPES[args.model]
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    cfg = config.load(None, [f"model.name={args.model}", f"data.dataset={dataset}", f"workers.n={world}",
                             "workers.byzantine=0", "aggregator.name=mean", "resampling.name=none",
                             "attack.name=none", f"train.batch_size={args.batch}", "log.progress=false"])
    ds = synthetic(shape)
    data.load = lambda _cfg: ds   # the benchmark needs no files on disk
    topo = distributed.setup(cfg)
    if topo.world < 2:
        print("run under torchrun with --nproc_per_node >= 2", file=sys.stderr)
        return 2

    harness = Trainer(cfg, topo)
    harness_ms = timed(harness.train_step, args.steps, args.warmup, topo.device)

    from torch.nn.parallel import DistributedDataParallel as DDP
    from byzddp import models
    model = models.build(cfg, shape, 10).to(topo.device)
    ddp = DDP(model, device_ids=[topo.device.index] if topo.device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg.train.lr)
    wd = harness.data
    step = [0]

    def ddp_step():
        x, y = wd.batch_of(topo.rank, step[0])
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        step[0] += 1

    ddp_ms = timed(ddp_step, args.steps, args.warmup, topo.device)
    if topo.is_server:
        print(f"| {args.model} | {harness.d:,} | {topo.world} x {topo.device.type} ({topo.backend}) | "
              f"{args.batch} | {harness_ms:.1f} | {ddp_ms:.1f} | {harness_ms / ddp_ms:.2f} |")
    distributed.teardown(clean=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
