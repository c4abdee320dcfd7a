"""Checkpoints: written atomically by rank 0, verified by a digest, loaded as data only.

A checkpoint is `checkpoints/step_<k>.pt` plus `step_<k>.pt.sha256`, the SHA-256 of the .pt
bytes. Both are written to a temporary name and renamed, the digest last, so a checkpoint
without a matching digest (a crash mid-write, a truncated copy) is never loaded: resume skips
it with a warning and takes the next newest. Loading uses torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from byzddp.config import ConfigError, config_hash

PATTERN = re.compile(r"^step_(\d+)\.pt$")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step_{trainer.step}.pt"
    _atomic_write(path, data)
    _atomic_write(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())
    for old in sorted(_steps(out))[:-keep]:
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


def _steps(out: Path):
    return [int(m.group(1)) for p in out.glob("step_*.pt") if (m := PATTERN.match(p.name))]


def read(path: Path, device) -> dict:
    """Load one checkpoint if its digest matches; raise ValueError otherwise."""
    digest_file = path.with_name(path.name + ".sha256")
    if not digest_file.is_file():
        raise ValueError("no digest file (the write did not finish)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest_file.read_text().strip():
        raise ValueError("digest mismatch (truncated or corrupt)")
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"not a plain-data checkpoint: {str(e).splitlines()[0][:200]}") from None


def newest_valid(run_dir, device):
    """(path, state) of the newest checkpoint that verifies, or (None, None)."""
    out = folder(run_dir)
    if not out.is_dir():
        return None, None
    for step in sorted(_steps(out), reverse=True):
        path = out / f"step_{step}.pt"
        try:
            return path, read(path, device)
        except Exception as e:  # a bad file is skipped, never half-loaded
            warnings.warn(f"skipping checkpoint {path}: {e}")
    return None, None


def resume(trainer, run_dir, how: str) -> Optional[Path]:
    """Load the checkpoint that `train.resume` names; every rank loads the same one."""
    if how == "off":
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
        except ValueError as e:
            raise ConfigError(f"config key train.resume: {path} cannot be used ({e})") from None
    if state.get("config_hash") != config_hash(trainer.cfg):
        message = (f"checkpoint {path} was written by another config (hash {state.get('config_hash')}, "
                   f"this run's is {config_hash(trainer.cfg)})")
        if how == "auto":
            raise ConfigError(f"config key train.resume: {message}; use another log.name or remove "
                              f"{folder(run_dir)}")
        warnings.warn(f"{message}; loading it as asked by train.resume")
    trainer.load_state_dict(state)
    return path
