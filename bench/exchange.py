"""The step's exchange and rule: DDP's all-reduce vs gather mode vs sharded aggregation.

    OMP_NUM_THREADS=1 nice torchrun --nproc_per_node=4 bench/exchange.py --workers 8 --dim 11.2e6

Every rank hosts n / world workers whose rows are random float32 vectors of d coordinates
(d = 11.2M is ResNet-18). Timed on each rank, the slowest rank counted, median of the repeats:
  all_reduce  one dist.all_reduce of a d-vector (what DDP pays for the mean);
  gather      gather to rank 0, resampling none and the rule there, broadcast of the update
              (byzddp.server.Server.aggregate);
  sharded     all_to_all of column slices, the rule per slice, all_gather of the update slices
              and of the rows' tails (byzddp.sharded.ShardedServer.step).
Both modes run the server side's own code on random rows (no model). Prints a markdown row per
rule: milliseconds and the ratios sharded / gather and each / all_reduce.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from byzddp import config, distributed  # noqa: E402
from byzddp.exchange import Exchange  # noqa: E402
from byzddp.sharded import ShardedServer  # noqa: E402
from byzddp.server import Server  # noqa: E402


def timed(fn, repeat: int, device) -> float:
    fn()
    out = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    t = torch.tensor(out, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)   # the slowest rank sets the pace
    return statistics.median(t.tolist()) * 1e3


def stand_in(cfg, topo, d: int, rule: str):
    """A Server (and this rank's rows of random vectors) without a model: what gather mode's rank 0
    and sharded mode's ranks aggregate."""
    g = torch.Generator().manual_seed(topo.rank)
    rows = torch.zeros(topo.block, d + 2)
    rows[:, :d] = torch.randn(topo.block, d, generator=g)
    cfg.aggregator.name = rule
    server = Server(cfg, SimpleNamespace(d=d, nb=0, device=topo.device), None, None)
    return server, rows.to(topo.device)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--dim", type=float, default=11.2e6)
    ap.add_argument("--rules", nargs="+", default=["mean", "cm", "krum", "rfa"])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    d = int(args.dim)
    cfg = config.load(None, [f"workers.n={args.workers}", "workers.byzantine=1", "resampling.name=none",
                             "aggregator.allow_unsafe=true", "attack.name=none", "log.progress=false"])
    topo = distributed.setup(cfg)
    if topo.world < 2:
        print("run under torchrun with --nproc_per_node >= 2", file=sys.stderr)
        return 2
    vector = torch.randn(d, device=topo.device)
    all_reduce_ms = timed(lambda: dist.all_reduce(vector), args.repeat, topo.device)
    if topo.is_server:
        print(f"{topo.world} ranks ({topo.backend}, {topo.device.type}), n = {args.workers}, d = {d:,}; "
              f"all_reduce of d: {all_reduce_ms:.0f} ms\n")
        print("| rule | gather ms | sharded ms | sharded / gather | gather / all_reduce | sharded / all_reduce "
              "| rule alone: rank 0, all d | rule alone: a rank's slice |")
        print("|---|---|---|---|---|---|---|---|", flush=True)
    for rule in args.rules:
        exchange, everyone = Exchange(topo), list(range(cfg.workers.n))
        server, rows = stand_in(cfg, topo, d, rule)

        def gather_step():
            gathered = exchange.gather(rows)
            if topo.is_server:
                server.aggregate(gathered, 0, [])
            exchange.broadcast(server.payload)

        gather_ms = timed(gather_step, args.repeat, topo.device)
        want = server.payload.clone()
        server, rows = stand_in(cfg, topo, d, rule)
        sharded = ShardedServer(server, exchange, topo)
        sharded_ms = timed(lambda: sharded.step(rows, 0, [], everyone), args.repeat, topo.device)
        same = torch.equal(server.payload, want)
        # The rule's own time: on all n x d rows (gather mode's rank 0; the others wait) and on
        # one slice (every rank at once; the Gram partials still cross ranks).
        full = torch.randn(args.workers, d, device=topo.device)
        whole_ms = timed(lambda: sharded.rule.aggregate(full) if topo.is_server else None,
                         args.repeat, topo.device)
        start, stop = sharded.ranges[topo.rank]
        piece = full[:, start:stop].contiguous()
        del full
        slice_ms = timed(lambda: sharded.rule.aggregate(piece, sharded.columns), args.repeat, topo.device)
        if topo.is_server:
            print(f"| {rule} | {gather_ms:.0f} | {sharded_ms:.0f} | {sharded_ms / gather_ms:.2f} | "
                  f"{gather_ms / all_reduce_ms:.1f} | {sharded_ms / all_reduce_ms:.1f} | {whole_ms:.0f} | "
                  f"{slice_ms:.0f} |" + ("" if same else " (updates differ!)"), flush=True)
        del server, sharded, rows
    distributed.teardown(clean=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
