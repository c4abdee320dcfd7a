"""A DDP step with byzddp.ddp.register's hook against DDP's own mean all-reduce, same model.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=4 bench/ddp_hook.py            # gloo on the CPU
    torchrun --nproc_per_node=8 bench/ddp_hook.py --device cuda --width 4096   # NCCL on GPUs
    python bench/ddp_hook.py --ranks 2 4                                       # starts the ranks itself

The model is an MLP 784 -> width -> width/4 -> 10 (width 1024: d = 1.07M parameters); a step is
forward, backward (the hook runs inside it) and an SGD update on a batch of 32 per rank. The
models (default, one per rule) take their steps in turn, so that a change in the machine's load
hits all of them alike. Timed on each rank, the slowest rank counted, median over the steps.
Prints one markdown row per rule: milliseconds, and the ratio to DDP's default step.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from byzddp import ddp as robust  # noqa: E402


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width // 4), nn.ReLU(),
                         nn.Linear(width // 4, 10))


def rank_main(args) -> None:
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    models = {}
    for rule in ["default", *args.rules]:
        net = mlp(args.width).to(device)
        model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
        if rule != "default":
            # krum's guarantee needs 2f+3 ranks: timing only, at f = 0
            robust.register(model, rule=rule, f=0, allow_unsafe=True)
        models[rule] = (model, torch.optim.SGD(net.parameters(), lr=0.01))
    d = sum(p.numel() for p in models["default"][0].parameters())
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(32, 784, generator=g).to(device)
    y = torch.randint(0, 10, (32,), generator=g).to(device)
    times = {rule: [] for rule in models}
    for step in range(args.warmup + args.steps):
        for rule, (model, opt) in models.items():
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times[rule].append(time.perf_counter() - t0)
    medians = {}
    for rule, t in times.items():
        t = torch.tensor(t, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)   # the slowest rank sets the pace
        medians[rule] = statistics.median(t.tolist()) * 1e3
    if rank == 0:
        base = medians["default"]
        backend = dist.get_backend()
        for rule, ms in medians.items():
            print(f"| {rule} | {world} | {backend} | {d / 1e6:.2f}M | {ms:.1f} | {ms / base:.2f} |", flush=True)
    dist.destroy_process_group()


def spawn(args, ranks: int) -> None:
    """Start `ranks` processes of this script with torchrun's environment variables."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, __file__, "--width", str(args.width), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--device", args.device, "--rules", *args.rules]
    procs = [subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                         "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks),
                                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(ranks)]
    if any(p.wait() for p in procs):
        sys.exit(f"bench/ddp_hook.py: a rank of the {ranks}-rank run failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024, help="hidden width (1024: d = 1.07M)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (DDP re-buckets after one)")
    ap.add_argument("--rules", nargs="+", default=["cm", "krum"])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--ranks", type=int, nargs="*", default=[], help="start this many ranks (else: torchrun's)")
    args = ap.parse_args()
    if "RANK" in os.environ:
        rank_main(args)
        # Skip the interpreter's teardown, as byzddp's command line does: gloo's threads, still
        # holding tensors, can abort it ("terminate called without an active exception").
        sys.stdout.flush()
        os._exit(0)
    print("| rule | ranks | backend | d | ms per step (median) | / DDP default |")
    print("|---|---|---|---|---|---|", flush=True)
    for ranks in args.ranks or [2]:
        spawn(args, ranks)


if __name__ == "__main__":
    main()
