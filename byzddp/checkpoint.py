"""Checkpoints: written atomically by rank 0, verified by a digest, loaded as data only.

A checkpoint is `checkpoints/step_<k>.pt` plus `step_<k>.pt.sha256`, the SHA-256 of the .pt
bytes. Both are written to a temporary name and renamed, the digest last, so a checkpoint
without a matching digest (a crash mid-write, a truncated copy) is never loaded: resume skips
it with a warning and takes the next newest. Loading uses torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
import io
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from byzddp import io as run_io
from byzddp.config import config_hash
from byzddp.errors import ConfigError

PATTERN = re.compile(r"^step_(\d+)\.pt$")


def folder(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def save(trainer, run_dir, keep: int = 3) -> Optional[Path]:
    """Collective: every rank takes part (worker momentum is gathered); rank 0 writes."""
    state = trainer.state_dict()
    if not trainer.topo.is_server:
        return None
    buf = io.BytesIO()
    torch.save(_to_cpu(state), buf)
    data = buf.getvalue()
    out = folder(run_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise run_io.OutputError(run_io.describe(out, e)) from None
    path = out / f"step_{trainer.step}.pt"
    run_io.write_atomic(path, data, fsync=True)
    try:
        run_io.write_atomic(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest(), fsync=True)
    except run_io.OutputError:
        path.unlink(missing_ok=True)     # a checkpoint without its digest is never loaded anyway
        raise
    # Only this run's lineage rotates: checkpoints numbered above the one just written belong
    # to another run (one resumed from an earlier path beside them) and are never deleted.
    for old in sorted(s for s in steps(out) if s <= trainer.step)[:-keep]:
        for p in (out / f"step_{old}.pt", out / f"step_{old}.pt.sha256"):
            p.unlink(missing_ok=True)
    return path


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def steps(out: Path) -> list:
    """The steps of the checkpoints in the folder `out`, by file name."""
    return [int(m.group(1)) for p in out.glob("step_*.pt") if (m := PATTERN.match(p.name))]


# What Trainer.state_dict() holds; a checkpoint missing any of them cannot be resumed.
KEYS = ("config_hash", "step", "model", "optimizer", "scheduler", "worker_momentum", "aggregator",
        "resampler", "attack", "previous_update", "selection_counts", "first_bad_step", "diagnostics",
        "history", "wall_seconds")


def read(path: Path, device) -> dict:
    """Load one checkpoint if its digest matches and it is whole; raise ValueError otherwise."""
    digest_file = path.with_name(path.name + ".sha256")
    if not digest_file.is_file():
        raise ValueError("no digest file (the write did not finish)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest_file.read_text().strip():
        raise ValueError("digest mismatch (truncated or corrupt)")
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"not a plain-data checkpoint: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise ValueError(f"not a checkpoint: it holds a {type(state).__name__}, not a dict")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise ValueError(f"missing key {', '.join(repr(k) for k in missing)}")
    named = PATTERN.match(path.name)
    if named and int(named.group(1)) != state["step"]:
        raise ValueError(f"it holds step {state['step']} but its name says step {named.group(1)}")
    return state


def newest_valid(run_dir, device):
    """(path, state) of the newest checkpoint that verifies, or (None, None)."""
    out = folder(run_dir)
    if not out.is_dir():
        return None, None
    for step in sorted(steps(out), reverse=True):
        path = out / f"step_{step}.pt"
        try:
            return path, read(path, device)
        except Exception as e:  # a bad file is skipped, never half-loaded
            warnings.warn(f"skipping checkpoint {path}: {e}")
    return None, None


def resume(trainer, run_dir, how: str) -> Optional[Path]:
    """Load the checkpoint that `train.resume` names; every rank loads the same one.

    Everything is checked before anything is loaded: the digest, plain data, every key, the
    step against the file name, and the config. A checkpoint of another config is refused
    (its tensors may not even fit this model)."""
    if how in ("off", "fresh"):     # fresh: the run folder set the earlier run's files aside
        return None
    if how == "auto":
        path, state = newest_valid(run_dir, trainer.device)
        # Ranks must agree on the step; rank 0's choice wins (all read the same folder).
        chosen = torch.tensor([state["step"] if state else -1], device=trainer.device)
        if dist.is_initialized():
            dist.broadcast(chosen, src=0)
        if int(chosen) < 0:
            return None
        if state is None or state["step"] != int(chosen):
            path = folder(run_dir) / f"step_{int(chosen)}.pt"
            state = read(path, trainer.device)
    else:
        path = Path(how)
        if not path.is_file():
            raise ConfigError(f"config key train.resume: {path} does not exist; use off, auto or a checkpoint path")
        try:
            state = read(path, trainer.device)
        except (OSError, ValueError) as e:
            raise ConfigError(f"config key train.resume: {path} cannot be used ({e}); use off, auto or "
                              f"a checkpoint this harness wrote") from None
    mine = config_hash(trainer.cfg)
    if state["config_hash"] != mine:
        message = (f"checkpoint {path} was written by another config (hash {state['config_hash']}, "
                   f"this run's is {mine})")
        if how == "auto":
            raise ConfigError(f"config key train.resume: {message}; use another log.name or remove "
                              f"{folder(run_dir)}")
        raise ConfigError(f"config key train.resume: {message}; resume it with the config that wrote it, "
                          f"or set train.resume=off")
    try:
        trainer.load_state_dict(state)
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"config key train.resume: {path} does not fit this run "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                          f"use train.resume=off") from None
    return path
