"""A round's time against its local steps K (train.local_steps): K steps of compute, one exchange.

    OMP_NUM_THREADS=1 python bench/local_steps.py                   # mlp and cnn, K = 1, 2, 5, 10
    OMP_NUM_THREADS=1 python bench/local_steps.py --models mlp --k 1,5 --loop

One process, one thread, n = 10 workers on MNIST-5k, batch 32, no attack, cm without
resampling. Per round (median over --rounds after one warm-up) the process CPU time of the
whole round and of the workers' part alone (client.compute_rows: the K local steps of every worker);
the rest (the exchange, the rule and the server's step) is their difference. Prints markdown
rows with the round's cost relative to K times the K = 1 round: 1.00 means a round of K local
steps costs K rounds' compute, and the rest is paid once.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(model: str, k: int, loop: bool, rounds: int) -> tuple:
    from byzddp import attacks, config, distributed
    from byzddp.trainer import Trainer

    cfg = config.load(None, [f"model.name={model}", "workers.n=10", "workers.byzantine=0", "attack.name=none",
                             "aggregator.name=cm", "resampling.name=none", f"train.local_steps={k}",
                             f"workers.vectorize={str(not loop).lower()}", "train.device=cpu",
                             "log.progress=false"])
    trainer = Trainer(cfg, distributed.setup(cfg))
    whole, workers = [], []
    for r in range(rounds + 1):             # the first round warms up (and builds vmap's plan)
        t0 = time.process_time()
        trainer.client.compute_rows(trainer.step, attacks.byzantine_set(cfg, trainer.step),
                                    lr=trainer.optimizer.param_groups[0]["lr"])
        t1 = time.process_time()
        trainer.train_step()                # the whole round: workers again, exchange, rule, step
        t2 = time.process_time()
        if r:
            workers.append(1e3 * (t1 - t0))
            whole.append(1e3 * (t2 - t1))
    how = f"torch.func, chunks of {trainer.client.vectorized.chunk}" if trainer.client.vectorized else "one by one"
    return statistics.median(whole), statistics.median(workers), how


def main() -> None:
    import torch
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--k", default="1,2,5,10", help="local steps to measure (1 is the baseline, always run)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--loop", action="store_true", help="workers one by one instead of vectorized")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ks = sorted({1, *(int(k) for k in args.k.split(","))})
    print(f"torch {torch.__version__}, 1 thread, n = 10, batch 32, "
          f"{'workers.vectorize=false' if args.loop else 'the default workers.vectorize=true'}\n")
    print("| model | workers | K | round ms | workers ms | rest ms | round / (K x round at K=1) "
          "| workers / (K x workers at K=1) |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        base = None
        for k in ks:
            whole, work, how = measure(model, k, args.loop, args.rounds)
            base = base or (whole, work)
            print(f"| {model} | {how} | {k} | {whole:.1f} | {work:.1f} | {whole - work:.1f} | "
                  f"{whole / (k * base[0]):.2f} | {work / (k * base[1]):.2f} |", flush=True)


if __name__ == "__main__":
    main()
