"""Step time of one process hosting n workers: the loop against vectorized workers (torch.func).

    python bench/workers.py                                 # cpu: mlp and cnn, n = 8, 32, 64, 128
    python bench/workers.py --device cuda --n 8,32,64,128,1024 --models mlp
    OMP_NUM_THREADS=1 nice -n 10 python bench/workers.py --models mlp --n 64

Each (model, n, mode) runs in a fresh process (so peak memory is its own): MNIST-5k, batch 32
per worker, no attack, the mean without resampling (the server's share is small and the same
for both modes). Prints markdown rows: median milliseconds per training step and for the
workers' gradients alone (CPU: process CPU time, CUDA: wall time), the chunk, and peak memory
(CUDA: max allocated; CPU: the process's peak resident set, torch's own ~0.8 GB included).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one(model: str, n: int, vectorize: bool, device: str, steps: int, chunk) -> dict:
    import torch

    from byzddp import attacks, config, distributed, workers
    from byzddp.trainer import Trainer

    def build(chunk):
        cfg = config.load(None, [f"model.name={model}", f"workers.n={n}", "workers.byzantine=0", "attack.name=none",
                                 "aggregator.name=mean", "resampling.name=none", f"train.device={device}",
                                 f"workers.vectorize={str(vectorize).lower()}", f"workers.chunk={chunk or 'null'}",
                                 "log.progress=false"])
        return cfg, Trainer(cfg, distributed.setup(cfg))
    cfg, trainer = build(chunk)
    if vectorize and trainer.client.vectorized is None:
        # On the CPU the run would take the loop (a chunk of < 4 workers): time torch.func at the
        # automatic chunk anyway, which is what this comparison is for.
        sample = trainer.ds.train_x[:cfg.train.batch_size]
        cfg, trainer = build(workers.VectorizedWorkers(trainer.model, 1, cfg.seed, sample).automatic_chunk(n, device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # On the CPU, the process's CPU time: with one thread it is the work done, and it stays
    # meaningful on a machine shared with other jobs; on CUDA, wall time after a synchronize.
    clock = time.perf_counter if device == "cuda" else time.process_time
    step_ms, grad_ms = [], []
    for k in range(steps + 1):          # the first step warms up (and builds vmap's plan)
        sync()
        t0 = clock()
        trainer.client.compute_rows(trainer.step, attacks.byzantine_set(cfg, trainer.step),
                                    lr=trainer.optimizer.param_groups[0]["lr"])
        sync()
        t1 = clock()
        trainer.train_step()            # a full step (gradients again, exchange, rule, update)
        sync()
        t2 = clock()
        if k:
            grad_ms.append(1e3 * (t1 - t0))
            step_ms.append(1e3 * (t2 - t1))
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": model, "n": n, "vectorize": vectorize, "device": device, "d": trainer.d,
            "step_ms": statistics.median(step_ms), "grad_ms": statistics.median(grad_ms),
            "chunk": trainer.client.vectorized.chunk if trainer.client.vectorized else None, "peak_mib": peak,
            "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--n", default="8,32,64,128")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "N", "VECTORIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        model, n, vec = args.one
        print(json.dumps(one(model, int(n), vec == "true", args.device, args.steps, args.chunk)))
        return
    print("| device | model | parameters | n | threads | loop ms/step | vectorized ms/step | speed-up "
          "| loop grads ms | vectorized grads ms | chunk | loop peak MiB | vectorized peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for n in [int(v) for v in args.n.split(",")]:
            res = {}
            for vec in ("false", "true"):
                cmd = [sys.executable, __file__, "--one", model, str(n), vec, "--device", args.device,
                       "--steps", str(args.steps)] + (["--chunk", str(args.chunk)] if args.chunk else [])
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
                if out.returncode:
                    sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
                res[vec] = json.loads(out.stdout.strip().splitlines()[-1])
            a, b = res["false"], res["true"]
            print(f"| {args.device} | {model} | {a['d']:,} | {n} | {a['threads']} | {a['step_ms']:.1f} | "
                  f"{b['step_ms']:.1f} | {a['step_ms'] / b['step_ms']:.2f}x | {a['grad_ms']:.1f} | "
                  f"{b['grad_ms']:.1f} | {b['chunk']} | {a['peak_mib']:.0f} | {b['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
