"""Run under torchrun by the tests: one training step, then rank 0 saves what the server saw.

Usage: torchrun ... tests/dist_probe.py OUT.pt key=value ...
Saves the gathered (n, width) rows, the payload broadcast, and the model before the step.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from byzddp import attacks, config, distributed  # noqa: E402
from byzddp.trainer import Trainer  # noqa: E402


def main():
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = config.load(None, overrides)
    topo = distributed.setup(cfg)
    trainer = Trainer(cfg, topo)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    byzantine = attacks.byzantine_set(cfg, 0)
    trainer.client.compute_rows(0, byzantine)
    trainer.attack.forge(attacks.AttackContext(0, cfg.seed, trainer.client.rows[:, :trainer.d], topo.workers,
                                               byzantine, trainer.exchange, cfg.workers.n, cfg.workers.byzantine))
    gathered = trainer.exchange.gather(trainer.client.rows)
    if topo.is_server:
        trainer.server.aggregate(gathered, 0, byzantine)
    trainer.exchange.broadcast(trainer.payload)
    agree = trainer.exchange.all_agree(trainer.payload.view(torch.int32).to(torch.int64).sum().view(1))
    if topo.is_server:
        torch.save({"gathered": gathered.clone(), "payload": trainer.payload.clone(), "before": before,
                    "d": trainer.d, "agree": agree}, out)
    distributed.teardown(clean=True)


if __name__ == "__main__":
    main()
