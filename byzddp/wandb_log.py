"""Weights & Biases logging for one run: `start`, `log`, `finish` (called from rank 0 only).

Logging must never cost a run: when wandb is missing or fails, each function warns once
and carries on without it. The one exception is `log.wandb=online` asked for explicitly with
wandb not installed, which is a configuration error (the user wants something we cannot do).
`offline` writes the run under `<run_dir>/wandb/` and never touches the network or asks
for a login; at the end the run's folder and the `wandb sync <folder>` that uploads it are
printed once.

The mode: `log.wandb` when it is offline or online. Left at off (the default), the
environment may turn W&B on: WANDB_MODE=offline (or wandb's alias dryrun) or online.
WANDB_MODE=disabled turns it off whatever log.wandb says (a site's or a CI's switch).
"""
from __future__ import annotations

import os
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

from byzddp import io
from byzddp.errors import ConfigError

MODES = ("off", "offline", "online")
ID_FILE = "wandb-id.txt"   # lets a resumed run continue the same W&B run
_warned: set = set()


def _warn(key: str, text: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f"byzddp: W&B {text}; continuing without it", file=sys.stderr, flush=True)


def effective_mode(configured: str, environ=None) -> str:
    """log.wandb, or WANDB_MODE when log.wandb is off (see the module's docstring)."""
    env = (os.environ if environ is None else environ).get("WANDB_MODE", "").strip().lower()
    if env == "disabled":
        return "off"
    if configured == "off" and env in ("offline", "dryrun", "online"):
        return "offline" if env == "dryrun" else env
    return configured


def _run_id(cfg_dict: dict, run_dir: Path) -> tuple:
    """A resumed run (train.resume not off) continues its W&B run; a fresh one gets a new id."""
    path = run_dir / ID_FILE
    resuming = str((cfg_dict.get("train") or {}).get("resume", "off")) != "off"
    if resuming and path.is_file():
        return path.read_text().strip(), "allow"
    run_id = secrets.token_hex(4)  # W&B ids: short, lowercase letters and digits
    io.write_atomic(path, run_id + "\n")
    return run_id, None


def _settings(wandb, mode: str):
    quiet = dict(console="off", silent=True, disable_git=True, save_code=False)
    if mode == "offline":
        # No system-metrics sampler: it adds seconds to every start and a process per run.
        try:
            return wandb.Settings(**quiet, x_disable_stats=True)
        except Exception:  # an older wandb without that setting
            pass
    return wandb.Settings(**quiet)


def start(cfg_dict: dict, run_dir: Path, mode: str, project: str, group: Optional[str],
          tags: list, name: str) -> Optional[Any]:
    """A W&B run logging `cfg_dict` as its config, or None (mode off, or W&B unavailable)."""
    if mode not in MODES:
        raise ConfigError(f"config key log.wandb: '{mode}' is not one of {', '.join(MODES)}")
    if mode == "off":
        return None
    try:
        import wandb
    except ImportError:
        if mode == "online":
            raise ConfigError("config key log.wandb: online needs the wandb package; "
                              "pip install wandb, or set log.wandb=offline|off") from None
        _warn("import", "is not installed (pip install wandb)")
        return None
    os.environ.setdefault("WANDB_SILENT", "true")  # no banners between our log lines
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id, resume = _run_id(cfg_dict, run_dir)
        settings = _settings(wandb, mode)
        return wandb.init(project=project, group=group, tags=[str(t) for t in tags], name=name,
                          config=cfg_dict, dir=str(run_dir), mode=mode, id=run_id, resume=resume,
                          settings=settings)
    except Exception as e:  # any failure of an optional logger: keep training
        _warn("init", f"could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None


def log(handle: Optional[Any], metrics: dict, step: int) -> None:
    if handle is None:
        return
    try:
        handle.log(dict(metrics), step=int(step))
    except Exception as e:
        _warn("log", f"could not log step {step} ({type(e).__name__})")


def finish(handle: Optional[Any], summary: dict) -> None:
    if handle is None:
        return
    try:
        offline = handle.settings.mode in ("offline", "dryrun")
        folder = Path(handle.dir).parent if offline else None   # <run>/wandb/offline-run-*/files
    except Exception:
        folder = None
    try:
        handle.summary.update(dict(summary))
        handle.finish()
    except Exception as e:
        _warn("finish", f"could not finish ({type(e).__name__})")
        return
    try:
        # finish() can return before W&B's service has written the run out (offline: the
        # .wandb file); teardown waits for it, so the files are complete when we return.
        import wandb
        wandb.teardown()
    except Exception as e:
        _warn("teardown", f"could not flush its files ({type(e).__name__})")
    if folder is not None:
        # Quoted: a log.dir or log.name with spaces or quotes must still paste into a shell.
        print(f"byzddp: W&B offline run in {folder}; upload it with: wandb sync {shlex.quote(str(folder))}",
              file=sys.stderr, flush=True)
