"""Run by tests/test_attacks.py, under torchrun or plain python: many attack cases in one
process group, a few real training steps each. Rank 0 saves, per case and step, the rows
every worker was about to send before the attack forged (gathered in worker order), the rows
actually sent, the Byzantine set, the aggregate, and at the end the model's digest; for cases
listed under "resume", also the digest of a run checkpointed after `resume_at` steps and
resumed in fresh trainers, and the attack's state in that checkpoint.

Usage: [torchrun ...] tests/attack_probe.py OUT.pt SPEC.json   (or `run(spec, folder)` in process)
SPEC.json: {"common": [key=value, ...], "steps": S, "resume_at": K,
            "cases": {label: [key=value, ...]}, "resume": [label, ...]}
"""
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from byzddp import attacks, checkpoint, config, data, distributed  # noqa: E402
from byzddp.trainer import Trainer  # noqa: E402

@contextlib.contextmanager
def datasets_read_once():
    """Every case reads the same digits: parse the file once, not once per trainer."""
    load, seen = data.load, {}

    def cached(cfg):
        key = (cfg.data.dataset, cfg.data.test_size)
        if key not in seen:
            seen[key] = load(cfg)
        return seen[key]

    data.load = cached
    try:
        yield
    finally:
        data.load = load


def record_steps(trainer, steps):
    """Take `steps` real steps, spying on the attack to see the rows before and after it."""
    seen = {"rows": [], "sent": [], "aggregate": [], "byzantine": []}
    forge = trainer.attack.forge

    def spy(ctx):
        seen["rows"].append(trainer.exchange.gather(ctx.rows.contiguous()))
        forge(ctx)
        seen["sent"].append(trainer.exchange.gather(ctx.rows.contiguous()))
        seen["byzantine"].append(list(ctx.byzantine))

    trainer.attack.forge = spy
    for _ in range(steps):
        trainer.train_step()
        seen["aggregate"].append(trainer.payload[:trainer.d].clone())
    trainer.attack.forge = forge
    if not trainer.topo.is_server:
        return None
    return {"rows": torch.stack(seen["rows"]), "sent": torch.stack(seen["sent"]),
            "aggregate": torch.stack(seen["aggregate"]), "byzantine": seen["byzantine"],
            "sha": trainer.model_sha256()}


def resumed(cfg, topo, steps, at, folder):
    """Train `at` steps, checkpoint, resume in a fresh trainer, finish: the final digest."""
    first = Trainer(cfg, topo)
    for _ in range(at):
        first.train_step()
    path = checkpoint.save(first, folder)
    second = Trainer(cfg, topo)
    checkpoint.resume(second, folder, "auto")
    assert second.step == at
    while second.step < steps:
        second.train_step()
    if not topo.is_server:
        return None, None
    return second.model_sha256(), checkpoint.read(path, torch.device("cpu"))["attack"]


def run(spec: dict, scratch: Path):
    """Every case of `spec`; the results on rank 0, None elsewhere. `scratch`: a folder that
    every rank sees (checkpoints of the resume cases)."""
    results, topo = {}, None
    with datasets_read_once():
        for label, overrides in spec["cases"].items():
            cfg = config.load(None, [*spec["common"], *overrides])
            topo = distributed.setup(cfg)
            got = record_steps(Trainer(cfg, topo), spec["steps"])
            if label in spec.get("resume", []):
                sha, state = resumed(cfg, topo, spec["steps"], spec["resume_at"], scratch / f"ckpt-{label}")
                if got is not None:
                    got["resumed_sha"], got["attack_state"] = sha, state
            if got is not None:
                got["policy"], got["real_f"] = attacks.policy(cfg), attacks.real_f(cfg)
                results[label] = got
    return {"results": results, "world": topo.world} if topo.is_server else None


def main():
    out, spec = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    got = run(spec, out.parent / f"{out.stem}-scratch")
    if got is not None:
        torch.save(got, out)
    distributed.teardown(clean=True)


if __name__ == "__main__":
    main()
