"""One training round end to end: byzddp's Trainer.train_step against ByzFL's own DSGD loop.

    OMP_NUM_THREADS=1 python bench/end_to_end.py --rounds 10
    OMP_NUM_THREADS=1 python bench/end_to_end.py --rounds 10 --n 25 --f 5

The task, the same on both sides: MNIST-5k (byzddp's `mnist5k`, data.load(cfg): the same
in-memory normalised tensors), byzddp's `cnn` (the official MNIST network, 1,199,882
parameters, the same initial weights), n workers of which f are Byzantine (default 25 and 5),
the n - f honest workers holding the same shards (byzddp's data.partition=sorted: the training
set sorted by label and cut into n - f equal shards; ByzFL's clients get exactly these index
sets), batch 32 per honest worker, no worker momentum, ALIE (byzddp `alie`; ByzFL
`ALittleIsEnough` with tau = -z, z = byzddp's alie_z(n, f), so both send mean - z * std), the
coordinate-wise median (byzddp `cm`, no resampling; ByzFL `Median`), plain SGD lr 0.01 on the
server, CPU, one thread (torch.set_num_threads(1)).

What is timed, per round, in process CPU time (time.process_time; with one thread it is the
work done and it stays meaningful on a machine shared with other jobs), after 2 warm-up rounds,
each side in a fresh process; the median over --rounds rounds is printed:

- byzddp: `trainer.train_step()` of a Trainer built in-process as bench/workers.py does
  (config.load(None, overrides), Trainer(cfg, distributed.setup(cfg)); world size 1, so the
  gather and broadcast are local), three ways: the default (workers.vectorize=true; on the CPU
  the cnn's activations leave 2 workers a vectorized chunk, so its workers run one by one),
  workers.vectorize=false (the loop, chosen explicitly), and torch.func forced with
  workers.chunk=2. The split comes from wrapping, on the instance, the methods train_step
  calls: trainer.client.compute_rows (the honest workers' gradients; ALIE needs none for the Byzantine
  workers), attack.forge, trainer.server.aggregate (the median) and trainer.apply (the optimizer
  step); "other" is what is left of train_step.
- ByzFL (0.0.11, its own classes, wired as byzfl/benchmark/train.py's DSGD branch): one
  `Client` per honest worker with its own DataLoader (Subset of the shard, batch 32,
  shuffle=True, as DataDistributor.idx_to_dataloaders builds them), `ByzantineClient` with
  ALittleIsEnough, `Server` with Median. A round: every client's compute_gradients(), the
  honest vectors by get_flat_gradients_with_momentum(), byz_client.apply_attack(...),
  server.update_model_with_gradients(honest + byzantine) (aggregate, set_gradients, SGD step,
  scheduler step), and the new model sent back to every client with set_model_state (the end
  of train.py's round). Its split is printed too.

How byzddp's cnn gets into ByzFL: ModelBaseInterface builds its model as
getattr(byzfl.fed_framework.models, model_name)(), so this script registers byzddp's class on
that module, `byzfl.fed_framework.models.byzddp_cnn = byzddp.models.MnistCNN`, and passes
model_name="byzddp_cnn" to Client and Server (no ByzFL file is changed); the server's weights
are then loaded from byzddp's initial model and sent to the clients, as train.py does.

Not the same (stated so in the output): ByzFL's benchmark reads MNIST through torchvision
(a PIL image and ToTensor/Normalize per example); here its DataLoaders index a TensorDataset of
the already normalised tensors, which only removes work from ByzFL's side. ByzFL's clients
keep store_per_client_metrics=True (its benchmark's default: an argmax per batch). Dropout
masks differ (different random streams), which does not change the work done.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WARMUP = 2
clock = time.process_time


# The byzddp runs: the default, the loop, and torch.func forced.
MODES = {"default": [], "loop": ["workers.vectorize=false"], "torch.func": ["workers.chunk=2"]}


def overrides(n: int, f: int, mode: str = "default") -> list:
    return ["data.dataset=mnist5k", "data.partition=sorted", "model.name=cnn", f"workers.n={n}",
            f"workers.byzantine={f}", "workers.momentum=0.0", "attack.name=alie", "aggregator.name=cm",
            "resampling.name=none", "train.batch_size=32", "train.lr=0.01", "train.momentum=0.0",
            "train.weight_decay=0.0", "train.device=cpu", "train.threads=1", "log.progress=false",
            *MODES[mode]]


def build_trainer(n: int, f: int, mode: str = "default"):
    from byzddp import config, distributed
    from byzddp.trainer import Trainer

    cfg = config.load(None, overrides(n, f, mode))
    return Trainer(cfg, distributed.setup(cfg))


def timed(parts: dict, key: str, fn):
    """fn, adding its CPU time to parts[key] (a wrapper set on the instance, not the class)."""
    def wrapper(*args, **kwargs):
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            parts[key] += clock() - t0
    return wrapper


def run_byzddp(n: int, f: int, mode: str, rounds: int) -> dict:
    import torch

    trainer = build_trainer(n, f, mode)
    keys = ("grads", "attack", "aggregate", "apply")
    parts = dict.fromkeys(keys, 0.0)
    trainer.client.compute_rows = timed(parts, "grads", trainer.client.compute_rows)
    trainer.attack.forge = timed(parts, "attack", trainer.attack.forge)
    trainer.server.aggregate = timed(parts, "aggregate", trainer.server.aggregate)
    trainer.apply = timed(parts, "apply", trainer.apply)
    rows = []
    for k in range(WARMUP + rounds):
        for key in keys:
            parts[key] = 0.0
        t0 = clock()
        trainer.train_step()
        total = clock() - t0
        if k >= WARMUP:
            row = {key: 1e3 * parts[key] for key in keys}
            row["total"] = 1e3 * total
            row["other"] = row["total"] - sum(row[key] for key in keys)
            rows.append(row)
    loss = float(trainer.payload[trainer.layout.train_loss])
    return {"side": "byzddp", "mode": mode, "d": trainer.d, "threads": torch.get_num_threads(),
            "chunk": trainer.client.vectorized.chunk if trainer.client.vectorized else None,
            "notes": trainer.notes, "last_loss": loss,
            "ms": {key: statistics.median(r[key] for r in rows) for key in rows[0]}}


def run_byzfl(n: int, f: int, rounds: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, Subset, TensorDataset

    import byzfl.fed_framework.models as byzfl_models
    from byzfl import ByzantineClient, Client, Server
    from byzddp import attacks
    from byzddp.attacks import alie_z
    from byzddp.models import MnistCNN

    # The byzddp cnn under a name ByzFL's ModelBaseInterface finds: getattr(models, name)().
    byzfl_models.byzddp_cnn = MnistCNN
    trainer = build_trainer(n, f)   # for its data, shards and initial weights only
    cfg, ds = trainer.cfg, trainer.ds
    byzantine = set(attacks.byzantine_set(cfg, 0))
    honest = [w for w in range(n) if w not in byzantine]
    shards = [trainer.data.indices[w].tolist() for w in honest]
    assert len(shards) == n - f and all(len(s) for s in shards)
    train = TensorDataset(ds.train_x, ds.train_y)
    test_loader = DataLoader(TensorDataset(ds.test_x, ds.test_y), batch_size=1000, shuffle=False)
    torch.manual_seed(0)
    clients = [Client({
        "model_name": "byzddp_cnn", "device": "cpu", "optimizer_name": None, "learning_rate": None,
        "loss_name": "CrossEntropyLoss", "weight_decay": None, "milestones": None, "learning_rate_decay": None,
        "LabelFlipping": False,
        "training_dataloader": DataLoader(Subset(train, shard), batch_size=32, shuffle=True),
        "momentum": 0.0, "nb_labels": ds.num_classes, "store_per_client_metrics": True,
    }) for shard in shards]
    server = Server({
        "model_name": "byzddp_cnn", "device": "cpu", "validation_loader": None, "test_loader": test_loader,
        "optimizer_name": "SGD", "learning_rate": 0.01, "weight_decay": 0.0, "milestones": [],
        "learning_rate_decay": 1.0, "aggregator_info": {"name": "Median", "parameters": {}}, "pre_agg_list": [],
    })
    z = alie_z(n, f)
    byz_client = ByzantineClient({"name": "ALittleIsEnough", "f": f, "parameters": {"tau": -float(z)}})
    server.model.load_state_dict(trainer.model.state_dict())   # byzddp's initial weights
    del trainer
    new_model = server.get_dict_parameters()
    for client in clients:
        client.set_model_state(new_model)
    d = sum(p.numel() for p in server.model.parameters())

    keys = ("grads", "flatten", "attack", "aggregate_step", "sync")
    rows = []
    for k in range(WARMUP + rounds):
        t = [clock()]
        losses = [client.compute_gradients() for client in clients]
        t.append(clock())
        honest_gradients = [client.get_flat_gradients_with_momentum() for client in clients]
        t.append(clock())
        byz_vectors = byz_client.apply_attack(honest_gradients)
        t.append(clock())
        server.update_model_with_gradients(honest_gradients + byz_vectors)
        t.append(clock())
        new_model = server.get_dict_parameters()
        for client in clients:
            client.set_model_state(new_model)
        t.append(clock())
        if k >= WARMUP:
            row = {key: 1e3 * (b - a) for key, a, b in zip(keys, t, t[1:])}
            row["total"] = 1e3 * (t[-1] - t[0])
            rows.append(row)
    return {"side": "byzfl", "d": d, "threads": torch.get_num_threads(), "z": z, "last_loss": sum(losses) / len(losses),
            "ms": {key: statistics.median(r[key] for r in rows) for key in rows[0]}}


def one(which: str, n: int, f: int, rounds: int) -> dict:
    import torch

    torch.set_num_threads(1)
    if which == "byzfl":
        return run_byzfl(n, f, rounds)
    return run_byzddp(n, f, which, rounds)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--n", type=int, default=25)
    ap.add_argument("--f", type=int, default=5)
    ap.add_argument("--one", choices=(*MODES, "byzfl"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.n, args.f, args.rounds)))
        return

    from importlib.metadata import version

    import torch

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    res = {}
    for which in (*MODES, "byzfl"):
        cmd = [sys.executable, __file__, "--one", which, "--n", str(args.n), "--f", str(args.f),
               "--rounds", str(args.rounds)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if out.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        res[which] = json.loads(out.stdout.strip().splitlines()[-1])

    b = res["byzfl"]
    ours = {mode: res[mode] for mode in MODES}
    threads = "/".join(str(r["threads"]) for r in res.values())
    print(f"torch {torch.__version__}, byzfl {version('byzfl')}, threads {threads} "
          f"({', '.join(MODES)}, ByzFL), OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, clock: process CPU time")
    print(f"task: mnist5k, cnn (d = {ours['default']['d']:,}; ByzFL's copy d = {b['d']:,}), n = {args.n}, "
          f"f = {args.f}, sorted shards for the {args.n - args.f} honest workers, batch 32, ALIE "
          f"(z = {b['z']:.4f}), median, SGD lr 0.01, cpu")
    print(f"rounds: {args.rounds} timed after {WARMUP} warm-up, median ms per round; each side in its own process")
    print("model in ByzFL: byzddp.models.MnistCNN registered as byzfl.fed_framework.models.byzddp_cnn")
    print("deviation: ByzFL's DataLoaders index in-memory normalised tensors (its benchmark decodes "
          "torchvision MNIST per example)")
    print()
    print("| side | workers | ms/round | byzddp / ByzFL |")
    print("|---|---|---|---|")
    for mode, r in ours.items():
        how = f"torch.func, chunks of {r['chunk']}" if r["chunk"] else "one by one"
        print(f"| byzddp {mode} | {how} | {r['ms']['total']:.1f} | {r['ms']['total'] / b['ms']['total']:.2f} |")
    print(f"| ByzFL | one by one | {b['ms']['total']:.1f} | 1.00 |")
    print()
    print("byzddp's round, split (median ms of each part; total is the median of the sums):")
    print("| mode | workers' gradients (compute_rows) | attack.forge | server.aggregate (median) | apply (SGD) "
          "| other | rest (total - gradients) | total | gradients share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, r in ours.items():
        m = r["ms"]
        print(f"| {mode} | {m['grads']:.1f} | {m['attack']:.1f} | {m['aggregate']:.1f} | {m['apply']:.1f} | "
              f"{m['other']:.1f} | {m['total'] - m['grads']:.1f} | {m['total']:.1f} | "
              f"{100 * m['grads'] / m['total']:.0f}% |")
    print()
    m = b["ms"]
    print("ByzFL's round, split:")
    print("| clients' compute_gradients | flat gradients | apply_attack | update_model_with_gradients "
          "| set_model_state x clients | total |")
    print("|---|---|---|---|---|---|")
    print(f"| {m['grads']:.1f} | {m['flatten']:.1f} | {m['attack']:.1f} | {m['aggregate_step']:.1f} | "
          f"{m['sync']:.1f} | {m['total']:.1f} |")
    print()
    losses = ", ".join(f"{mode} {r['last_loss']:.3f}" for mode, r in ours.items())
    print(f"last round's honest train loss: byzddp {losses}, ByzFL {b['last_loss']:.3f}")
    for mode, r in ours.items():
        for note in r["notes"]:
            print(f"byzddp note ({mode}): {note}")


if __name__ == "__main__":
    main()
