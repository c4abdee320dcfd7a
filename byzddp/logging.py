"""What a run leaves behind: config.yaml, metrics.jsonl, summary.json, progress, W&B; and
the run folder's rules.

Only rank 0 writes. Files that must never be half-written (owner.json, config.yaml,
summary.json) go through byzddp.io.write_atomic; metrics.jsonl is appended one whole line at
a time. A write that fails (full disk, read-only folder) stops the run with one line.

A run folder belongs to one config: owner.json records the config_hash of the run that
started there. Another config is refused; the same config may resume there (train.resume),
or start again if it never finished, but a finished summary.json is never overwritten
without train.resume. While a run lives, rank 0 holds an exclusive lock on `<run>/.lock`
(fcntl.flock: the kernel drops it when the process dies, so a killed or preempted job never
leaves a stale lock), and a second run in the same folder is refused.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import yaml

from byzddp import attacks, rounds
from byzddp import config as config_mod
from byzddp import io
from byzddp.errors import ConfigError

OWNER, LOCK = "owner.json", ".lock"
ASIDE = "previous-"          # train.resume=fresh: <run>/previous-<time>/ holds the earlier run's files
KEPT = {OWNER, LOCK}        # what train.resume=fresh leaves in place
HEARTBEAT_S = 60.0        # without a terminal: a progress line at least this often


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_owner(run_dir: Path) -> Optional[str]:
    """The config_hash a run folder belongs to: owner.json, else a finished summary.json
    (folders written before owner.json existed); None for a new folder."""
    for name in (OWNER, "summary.json"):
        try:
            found = json.loads((run_dir / name).read_text()).get("config_hash")
        except (OSError, ValueError, AttributeError):
            continue
        if found:
            return str(found)
    return None


def checkpoint_steps(run_dir: Path) -> list:
    """The steps of the checkpoints in a run folder, by file name (not verified)."""
    from byzddp import checkpoint
    return checkpoint.steps(checkpoint.folder(run_dir))


def _only_aside(run_dir: Path) -> bool:
    return all(e in KEPT or e.startswith(ASIDE) for e in os.listdir(run_dir))


class RunFolder:
    """Rank 0's claim on `<log.dir>/<name>` for the life of the run; `close()` releases it."""

    def __init__(self, cfg, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.lock = None
        mine = config_mod.config_hash(cfg)
        blocker = _first_existing(self.run_dir)
        if not blocker.is_dir():
            raise ConfigError(f"config key log.dir: {blocker} is a file, not a folder, so the run folder "
                              f"{self.run_dir} cannot be made; set log.dir to a folder")
        self.created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Never through a link: one planted at .lock would get this run's PID written into
            # whatever it points to (in a shared log.dir, another user's file).
            self.lock = os.fdopen(os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
        except OSError as e:
            if (self.run_dir / LOCK).is_symlink():
                raise ConfigError(f"config key log.name: {self.run_dir / LOCK} is a symbolic link, which a run "
                                  f"never writes through; remove it, or use another log.name") from None
            if e.errno == errno.ENAMETOOLONG:    # a file system with a shorter limit than NAME_MAX
                raise ConfigError(f"config key log.name: the run folder name {self.run_dir.name[:40]}... "
                                  f"({len(self.run_dir.name.encode())} bytes) is too long for the file "
                                  f"system under {blocker}; give a shorter log.name (or a shorter "
                                  f"log.dir)") from None
            raise ConfigError(f"config key log.dir: cannot create the run folder {self.run_dir} "
                              f"({e.strerror or e}); set log.dir to a writable folder") from None
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.seek(0)
            holder = self.lock.read().strip()
            self.close()
            raise ConfigError(f"config key log.name: the run folder {self.run_dir} is in use by another "
                              f"run{f' (process {holder})' if holder else ''}; wait for it to end, "
                              f"or use another log.name") from None
        except OSError as e:
            # Some shared filesystems have no locks (Lustre mounted without flock, old NFS):
            # the run goes on, only unguarded against a second live run.
            warnings.warn(f"cannot lock {self.run_dir / LOCK} ({e.strerror or e}); a second run in "
                          f"this folder at the same time would not be stopped")
        else:
            try:                         # who holds it, for the refusal above in another run
                self.lock.seek(0)
                self.lock.truncate()
                self.lock.write(f"{os.getpid()}\n")
                self.lock.flush()
            except OSError:
                pass
        owner = folder_owner(self.run_dir)
        if owner is not None and owner != mine:
            self.close()
            raise ConfigError(f"config key log.name: the run folder {self.run_dir} belongs to another config "
                              f"(hash {owner}, this run's is {mine}); use another log.name, or remove the folder")
        if (self.run_dir / "summary.json").exists() and cfg.train.resume == "off":
            self.close()
            raise ConfigError(f"config key train.resume: the run folder {self.run_dir} holds a finished run of "
                              f"this config (summary.json); run it again with train.resume=auto, start over "
                              f"with train.resume=fresh, or use another log.name")
        # An interrupted run of this config left checkpoints: starting over beside them would
        # rotate the new run's own checkpoints away (the old ones are numbered higher) and drop
        # the old run without a word. Resume it, or say fresh and its files are kept aside.
        steps = checkpoint_steps(self.run_dir)
        if steps and cfg.train.resume == "off":
            self.close()
            raise ConfigError(f"config key train.resume: the run folder {self.run_dir} holds a checkpoint at "
                              f"step {max(steps)} of this config (an interrupted run); resume it with "
                              f"train.resume=auto, or start over with train.resume=fresh (its files are "
                              f"moved to {self.run_dir / 'previous-<time>'})")
        if cfg.train.resume == "fresh" and not _only_aside(self.run_dir):
            aside = self._set_aside()
            print(f"byzddp: train.resume=fresh: the earlier run's files are now in {aside}", file=sys.stderr,
                  flush=True)

    def _set_aside(self) -> Path:
        """Move every file of the earlier run (not the lock, the owner, earlier set-asides) into
        <run>/previous-<UTC time>/; nothing is deleted."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside, k = self.run_dir / f"{ASIDE}{stamp}", 1
        while aside.exists():
            aside, k = self.run_dir / f"{ASIDE}{stamp}-{k}", k + 1
        try:
            aside.mkdir()
            for entry in sorted(os.listdir(self.run_dir)):
                if entry not in KEPT and not entry.startswith(ASIDE):
                    os.replace(self.run_dir / entry, aside / entry)
        except OSError as e:
            self.close()
            raise ConfigError(f"config key train.resume: cannot move the earlier run's files to {aside} "
                              f"({e.strerror or e}); move them yourself, or use another log.name") from None
        return aside

    def close(self) -> None:
        if self.lock is None:
            return
        if self.created and not (self.run_dir / OWNER).exists():
            # The run stopped before training began (bad data, a refused checkpoint): leave
            # no folder behind that holds nothing but our lock.
            (self.run_dir / LOCK).unlink(missing_ok=True)
            try:
                self.run_dir.rmdir()
            except OSError:
                pass
        self.lock.close()                # closing the descriptor drops the flock
        self.lock = None


def claim(cfg, run_dir: Path, topo) -> Optional[RunFolder]:
    """Rank 0 claims the folder; every rank learns whether it may go on (a collective)."""
    folder, message = None, ""
    if topo.is_server:
        try:
            folder = RunFolder(cfg, run_dir)
        except ConfigError as e:
            message = str(e)
    if topo.world > 1:
        import torch
        import torch.distributed as dist
        refused = torch.tensor([1 if message else 0], device=topo.device)
        dist.broadcast(refused, src=0)
        if int(refused) and not message:
            message = f"rank 0 refused the run folder {run_dir}"
    if message:
        raise ConfigError(message)
    return folder


def finite_json(record: dict) -> dict:
    """`record` as strict JSON can hold it: JSON has no NaN or infinity, so a non-finite number
    (the test loss of a diverged model) becomes null, and `non_finite` maps
    each such key (dotted into nested values) to what it was: "nan", "inf" or "-inf"."""
    found: dict = {}

    def clean(value, key: str):
        if isinstance(value, float) and not math.isfinite(value):
            found[key] = "nan" if value != value else ("inf" if value > 0 else "-inf")
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    out = clean(record, "")
    if found:
        out["non_finite"] = {**(out.get("non_finite") or {}), **found}
    return out


def dumps(record: dict, **kwargs) -> str:
    """One run file's JSON: strict (no NaN, no Infinity), as any JSON reader takes it."""
    return json.dumps(finite_json(record), allow_nan=False, **kwargs)


class RunLogger:
    def __init__(self, cfg, run_dir: Path, is_writer: bool):
        self.cfg, self.run_dir, self.is_writer = cfg, Path(run_dir), is_writer
        self.bar = None
        self.wandb = None
        self.rounds: Optional[Path] = None      # participation.jsonl, when a round draws workers
        self.total, self.first_step, self.began, self.last_line = cfg.train.steps, 0, 0.0, 0.0

    def start(self, trainer) -> None:
        if not self.is_writer:
            return
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tree = config_mod.to_dict(cfg)
        io.write_atomic(self.run_dir / OWNER, json.dumps({"config_hash": config_mod.config_hash(cfg)}) + "\n")
        io.write_atomic(self.run_dir / "config.yaml", yaml.safe_dump(tree, sort_keys=False))
        metrics = self.run_dir / "metrics.jsonl"
        # On resume keep exactly the evaluations the checkpoint knows about.
        io.write_atomic(metrics, "".join(dumps(h) + "\n" for h in trainer.history))
        # workers.participation < 1: one line per round, its drawn workers and which of them
        # attack. The draw is a function of (seed, step), so a resumed run rewrites the rounds
        # its checkpoint has taken and appends from there.
        if rounds.workers_per_round(cfg) < cfg.workers.n:
            self.rounds = self.run_dir / "participation.jsonl"
            io.write_atomic(self.rounds, "".join(self._round_line(s) + "\n" for s in range(trainer.step)))
        print(f"byzddp: {cfg.data.dataset} ({cfg.data.partition}), {cfg.model.name} with "
              f"{trainer.d:,} parameters, n={cfg.workers.n} workers (f={cfg.workers.byzantine} declared, "
              f"attack {cfg.attack.name}), rule {cfg.aggregator.name} after {cfg.resampling.name}"
              f"{'' if cfg.resampling.name == 'none' else f' s={cfg.resampling.s}'}; "
              f"{trainer.topo.world} rank(s), {trainer.topo.backend}, {trainer.device}; "
              f"batch {cfg.train.batch_size} per worker"
              f"{f', {cfg.train.local_steps} local steps a round' if cfg.train.local_steps > 1 else ''}"
              f"{f', {rounds.workers_per_round(cfg)} workers a round' if self.rounds else ''}",
              file=sys.stderr, flush=True)
        if trainer.step:
            print(f"byzddp: resumed at step {trainer.step}", file=sys.stderr, flush=True)
        self.first_step, self.began = trainer.step, time.monotonic()
        self.last_line = self.began
        # A live bar on a terminal only; in a log file (Slurm, nohup) carriage returns would
        # pile up, so plain lines instead: one per evaluation, and one at least every minute.
        if cfg.log.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.train.steps, initial=trainer.step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
        from byzddp import wandb_log
        mode = wandb_log.effective_mode(cfg.log.wandb)
        if mode != "off":
            self.wandb = wandb_log.start(tree, self.run_dir, mode, cfg.log.wandb_project,
                                         cfg.log.wandb_group, list(cfg.log.tags), self.run_dir.name)

    def _rate(self, step: int) -> str:
        took = time.monotonic() - self.began
        done = step - self.first_step
        if done <= 0 or took <= 0:
            return ""
        left = (self.total - step) * took / done
        return f", {done / took:.1f} step/s, {left:.0f}s left"

    def _round_line(self, step: int) -> str:
        drawn = rounds.participants(self.cfg, step)
        byzantine = [w for w in attacks.byzantine_set(self.cfg, step) if w in drawn]
        return json.dumps({"step": step + 1, "workers": drawn, "byzantine": byzantine})

    def tick(self, step: int) -> None:
        if self.is_writer and self.rounds is not None:
            io.append_line(self.rounds, self._round_line(step - 1))
        if self.bar is not None:
            self.bar.update(1)
        elif self.is_writer and self.cfg.log.progress and time.monotonic() - self.last_line >= HEARTBEAT_S:
            self.last_line = time.monotonic()
            print(f"step {step}/{self.total}{self._rate(step)}", file=sys.stderr, flush=True)

    def metrics(self, record: dict) -> None:
        if not self.is_writer:
            return
        io.append_line(self.run_dir / "metrics.jsonl", dumps(record))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['test_accuracy']:.3f}")
        else:
            self.last_line = time.monotonic()
            step = record["step"]
            asr = record.get("attack_success_rate")
            print(f"step {step}/{self.total}: test_accuracy {record['test_accuracy']:.4f} "
                  f"test_loss {record['test_loss']:.4f} train_loss {record['train_loss']:.4f}"
                  f"{'' if asr is None else f' attack_success_rate {asr:.4f}'}"
                  f"{self._rate(step) if self.cfg.log.progress else ''}", file=sys.stderr, flush=True)
        if self.wandb is not None:
            from byzddp import wandb_log
            wandb_log.log(self.wandb, record, record["step"])

    def close(self) -> None:
        """End the bar's line, so that whatever is printed next starts on its own line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self, summary: Optional[dict]) -> None:
        """Write summary.json; None (a stopped run) writes nothing but still closes W&B's run,
        so that its files are whole and the resumed run continues it."""
        self.close()
        if not self.is_writer:
            return
        if summary is not None:
            io.write_atomic(self.run_dir / "summary.json", dumps(summary, indent=2) + "\n")
        if self.wandb is not None:
            from byzddp import wandb_log
            handle, self.wandb = self.wandb, None
            wandb_log.finish(handle, summary or {})
