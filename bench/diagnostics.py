"""What the server's per-round diagnostics cost against a round.

    OMP_NUM_THREADS=1 python bench/diagnostics.py --rounds 8
    OMP_NUM_THREADS=1 python bench/diagnostics.py --rounds 8 --model mlp --n 10 --f 2 --rule cm

A Trainer built in process (world size 1), the task of bench/end_to_end.py by default: MNIST-5k,
the cnn (1.2M parameters), n = 25 workers of which f = 5 send ALIE, Krum after no
pre-aggregation (a rule that selects, so the selection rates are computed too). Each round is
timed in process CPU time, alternately with the diagnostics forced on and off (the same rounds
otherwise), after 2 warm-up rounds; the medians are printed, with the cost of a diagnosed
round and the share of the run at the default (diagnostics at evaluations only: one round in
train.eval_every = 30).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--n", type=int, default=25)
    ap.add_argument("--f", type=int, default=5)
    ap.add_argument("--rule", default="krum")
    args = ap.parse_args()

    import torch
    from byzddp import config, distributed
    from byzddp.trainer import Trainer

    torch.set_num_threads(1)
    cfg = config.load(None, [f"model.name={args.model}", f"workers.n={args.n}", f"workers.byzantine={args.f}",
                             f"aggregator.name={args.rule}", "resampling.name=none", "attack.name=alie",
                             "log.progress=false", "aggregator.allow_unsafe=true"])
    trainer = Trainer(cfg, distributed.setup(cfg))
    times = {True: [], False: []}
    for k in range(4 + 2 * args.rounds):
        on = k % 2 == 0
        trainer.diagnosed = lambda step, on=on: on
        t0 = time.process_time()
        trainer.train_step()
        if k >= 4:
            times[on].append(time.process_time() - t0)
    on, off = (statistics.median(times[b]) * 1e3 for b in (True, False))
    every = cfg.train.eval_every
    print(f"{args.model} ({trainer.d:,} parameters), n={args.n}, f={args.f}, alie, {args.rule}: "
          f"round {off:.1f} ms, diagnosed round {on:.1f} ms: +{on - off:.1f} ms ({(on - off) / off:.1%} of a round); "
          f"at the default (one round in train.eval_every={every}) {(on - off) / every / off:.2%} of the run")
    print(trainer.server.diagnosed.since_last())


if __name__ == "__main__":
    main()
