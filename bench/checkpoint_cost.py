"""How long a checkpoint takes, and what it costs per step at the default interval.

    python bench/checkpoint_cost.py --model resnet20
    python bench/checkpoint_cost.py --model cnn --workers 10 --momentum 0.9

Trains on synthetic tensors of the dataset's shape (no download), times `train_step` and
`checkpoint.save` (state gathered, serialised, hashed, written and renamed, old ones pruned),
and prints milliseconds per step, per checkpoint, and the checkpoint's share of a step at
`train.checkpoint_every` (the config default unless --every is given).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from byzddp import checkpoint, config, data, distributed  # noqa: E402
from byzddp.trainer import Trainer  # noqa: E402
from step_overhead import SHAPES, synthetic  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20", choices=sorted(SHAPES))
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--momentum", type=float, default=0.9, help="worker momentum (more state to save)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--every", type=int, default=None)
    args = ap.parse_args()
    dataset, shape = SHAPES[args.model]
    cfg = config.load(None, [f"model.name={args.model}", f"data.dataset={dataset}", f"workers.n={args.workers}",
                             "workers.byzantine=0", "aggregator.name=cclip", "resampling.name=none",
                             "attack.name=none", f"workers.momentum={args.momentum}", "train.momentum=0.9",
                             "log.progress=false"])
    every = args.every or cfg.train.checkpoint_every
    ds = synthetic(shape)
    data.load = lambda _cfg: ds
    trainer = Trainer(cfg, distributed.setup(cfg))
    trainer.train_step()   # warm-up: optimizer state exists from here on
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.train_step()
        steps.append(time.perf_counter() - t0)
    saves = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.saves):
            t0 = time.perf_counter()
            path = checkpoint.save(trainer, tmp, keep=cfg.train.keep_checkpoints)
            saves.append(time.perf_counter() - t0)
            trainer.step += 1
        size = path.stat().st_size
    step_ms, save_ms = statistics.median(steps) * 1e3, statistics.median(saves) * 1e3
    print(f"| {args.model} | {trainer.d:,} | {args.workers} | {size / 2**20:.1f} MiB | {step_ms:.0f} | "
          f"{save_ms:.0f} | {every} | {save_ms / every / step_ms * 100:.2f}% |")
    distributed.teardown(clean=True)


if __name__ == "__main__":
    main()
