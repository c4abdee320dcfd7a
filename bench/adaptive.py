"""What the adaptive attack costs per step, against alie and optimal_alie, at one config.

Two measurements, one process (one rank, the CPU unless --device):
  forge   the attack's forge alone on n seeded rows of d coordinates (the rule and
          pre-aggregation of the config; the attacker's pipeline evaluations included);
  step    a whole training step of the trainer (workers' gradients, attack, rule, update) on
          MNIST-5k with the model of --model, median over --steps after one warm-up step.

    OMP_NUM_THREADS=1 python bench/adaptive.py
    OMP_NUM_THREADS=1 python bench/adaptive.py --rule krum --model cnn --steps 5

Prints a markdown table: milliseconds (median), pipeline evaluations per step, and the ratio to
alie's. Also which family adaptive chose how often during the timed steps.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from byzddp import attacks, config, distributed, pipeline  # noqa: E402
from byzddp.attacks import AttackContext  # noqa: E402
from byzddp.exchange import Exchange  # noqa: E402
from byzddp.trainer import Trainer  # noqa: E402

ATTACKS = ("alie", "optimal_alie", "adaptive")


def evaluations(cfg) -> int:
    a = cfg.attack
    return {"alie": 0, "optimal_alie": a.search_evals, "adaptive": 4 * a.grid + 5}[a.name]


def forge_ms(cfg, d: int, repeats: int, device: torch.device) -> float:
    n, f = cfg.workers.n, cfg.workers.byzantine
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(d, generator=g) + torch.randn(n, d, generator=g)).to(device)
    attack = attacks.from_config(cfg)
    topo = distributed.Topology(0, 1, 0, device, "none", n)
    times = []
    for step in range(repeats + 1):
        sent = rows.clone()
        ctx = AttackContext(step, cfg.seed, sent, range(n), list(range(n - f, n)), Exchange(topo), n, f,
                            pipeline.build(cfg) if attack.needs_pipeline else None, None)
        start = time.perf_counter()
        attack.forge(ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:])


def step_ms(cfg, steps: int):
    topo = distributed.setup(cfg)
    trainer = Trainer(cfg, topo)
    trainer.train_step()
    times, chosen = [], {}
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
        choice = getattr(trainer.attack, "choice", None)
        if choice:
            chosen[choice[0]] = chosen.get(choice[0], 0) + 1
    return 1e3 * statistics.median(times), trainer.d, chosen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rule", default="cm")
    p.add_argument("--resampling", default="none")
    p.add_argument("--model", default="mlp")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--f", type=int, default=2)
    p.add_argument("--d", type=int, default=100_000, help="coordinates of the forge-only rows")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*", help="extra dotted.key=value (e.g. attack.grid=2)")
    args = p.parse_args(argv)
    common = [f"workers.n={args.n}", f"workers.byzantine={args.f}", f"aggregator.name={args.rule}",
              f"resampling.name={args.resampling}", f"model.name={args.model}", "data.dataset=mnist5k",
              "data.partition=sorted", "log.progress=false", "train.checkpoint_every=0", "aggregator.allow_unsafe=true",
              f"train.device={args.device}", *args.overrides]
    print(f"{args.rule} after {args.resampling}, n={args.n}, f={args.f}, torch threads {torch.get_num_threads()}, "
          f"{args.device}\n")
    print(f"| attack | pipeline evals / step | forge ms (d={args.d:,}) | x alie | train step ms ({args.model}) | x alie |")
    print("|---|---|---|---|---|---|")
    base, picks = None, {}
    for name in ATTACKS:
        cfg = config.load(None, [*common, f"attack.name={name}"])
        forge = forge_ms(cfg, args.d, args.repeats, torch.device(args.device))
        step, d, chosen = step_ms(cfg, args.steps)
        base = base or (forge, step)
        print(f"| {name} | {evaluations(cfg)} | {forge:.1f} | {forge / base[0]:.1f} | {step:.1f} (d={d:,}) | "
              f"{step / base[1]:.2f} |", flush=True)
        picks = chosen or picks
    print(f"\nadaptive chose, over {args.steps} timed steps: "
          + ", ".join(f"{k} {v}" for k, v in sorted(picks.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
