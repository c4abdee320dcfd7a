"""What a run leaves behind: config.yaml, metrics.jsonl, summary.json, a progress bar, W&B.

Only rank 0 writes. Files that must never be half-written (config.yaml, summary.json) are
written to a temporary name and renamed; metrics.jsonl is appended one whole line at a time.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import yaml

from byzddp import config as config_mod


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunLogger:
    def __init__(self, cfg, run_dir: Path, is_writer: bool):
        self.cfg, self.run_dir, self.is_writer = cfg, Path(run_dir), is_writer
        self.bar = None
        self.wandb = None

    def start(self, trainer) -> None:
        if not self.is_writer:
            return
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tree = config_mod.to_dict(cfg)
        write_atomic(self.run_dir / "config.yaml", yaml.safe_dump(tree, sort_keys=False))
        metrics = self.run_dir / "metrics.jsonl"
        # On resume keep exactly the evaluations the checkpoint knows about.
        write_atomic(metrics, "".join(json.dumps(h) + "\n" for h in trainer.history))
        print(f"byzddp: {cfg.data.dataset} ({cfg.data.partition}), {cfg.model.name} with "
              f"{trainer.d:,} parameters, n={cfg.workers.n} workers (f={cfg.workers.byzantine} declared, "
              f"attack {cfg.attack.name}), rule {cfg.aggregator.name} after {cfg.resampling.name}"
              f"{'' if cfg.resampling.name == 'none' else f' s={cfg.resampling.s}'}; "
              f"{trainer.topo.world} rank(s), {trainer.topo.backend}, {trainer.device}; "
              f"batch {cfg.train.batch_size} per worker", file=sys.stderr, flush=True)
        if trainer.step:
            print(f"byzddp: resumed at step {trainer.step}", file=sys.stderr, flush=True)
        if cfg.log.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.train.steps, initial=trainer.step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
        if cfg.log.wandb != "off":
            from byzddp import wandb_log
            self.wandb = wandb_log.start(tree, self.run_dir, cfg.log.wandb, cfg.log.wandb_project,
                                         cfg.log.wandb_group, list(cfg.log.tags), self.run_dir.name)

    def tick(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def metrics(self, record: dict) -> None:
        if not self.is_writer:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['test_accuracy']:.3f}")
        elif not self.cfg.log.progress:
            print(f"step {record['step']}: test_accuracy {record['test_accuracy']:.4f} "
                  f"test_loss {record['test_loss']:.4f} train_loss {record['train_loss']:.4f}",
                  file=sys.stderr, flush=True)
        if self.wandb is not None:
            from byzddp import wandb_log
            wandb_log.log(self.wandb, record, record["step"])

    def finish(self, summary: Optional[dict]) -> None:
        if self.bar is not None:
            self.bar.close()
        if not self.is_writer or summary is None:
            return
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self.wandb is not None:
            from byzddp import wandb_log
            wandb_log.finish(self.wandb, summary)
