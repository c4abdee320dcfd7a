"""Run state, resume and execution: which runs are done, and running the rest.

A run is done when its folder's summary.json holds the config_hash of the run's resolved
config; a folder of another config is moved to <out>/stale/ before the run starts; a
started run of the same config continues from its checkpoints (train.resume=auto).

Three ways to run the unfinished runs: a local pool of `--jobs` processes (one thread
each waits on its process; the sweep waits on their futures; plain runs are forked from a
server that imported torch once, byzddp/sweep/forked.py), each under torchrun (`--nproc`),
or a run list for a Slurm job array (`--slurm`: line i = run i's arguments).
Ctrl-C (SIGINT) ends every run this sweep started, with its whole process group
(SIGTERM, then SIGKILL after 15 s), and starts no other.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from byzddp import config as config_mod
from byzddp import io as run_io
from byzddp.errors import ConfigError
from byzddp.sweep.forked import ForkedRun
from byzddp.sweep.grid import Run, Sweep, yaml_scalar
from byzddp.sweep.spec import safe

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
STOP_GRACE_S = 15                # SIGTERM, then SIGKILL after this long


def read_summary(run_dir: Path) -> Optional[dict]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def folder_hash(run_dir: Path) -> Optional[str]:
    """The config_hash of a run folder: from summary.json when finished, else from the
    config.yaml a started run wrote; None for an empty or missing folder."""
    summary = read_summary(run_dir)
    if summary is not None:
        return str(summary.get("config_hash"))
    try:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    except OSError:
        return None
    except yaml.YAMLError:
        return "unreadable"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return config_mod.config_hash(config_mod.from_dict(tree))
    except (ConfigError, TypeError, AttributeError):
        return "unreadable"


def status(sweep: Sweep, run: Run) -> str:
    """done: a summary of this run's config; pending: nothing yet, or started with this
    config (it resumes from its checkpoints); stale: the folder holds another config."""
    run_dir = sweep.runs_dir / run.id
    if (run_dir / "summary.json").exists():
        return "done" if folder_hash(run_dir) == run.hash else "stale"
    found = folder_hash(run_dir)
    return "pending" if found in (None, run.hash) else "stale"


def prepare(sweep: Sweep) -> List[Run]:
    """The runs still to do; folders of another config are moved to <out>/stale/ first, so
    that a run never resumes from, or reports, another config's state."""
    todo = []
    for run in sweep.runs:
        state = status(sweep, run)
        if state == "stale":
            _move_stale(sweep, run)
        if state != "done":
            todo.append(run)
    return todo


def train_args(sweep: Sweep, run: Run, wandb: Optional[str] = None) -> List[str]:
    """The argument list for train.py (what runs.txt holds, one run a line)."""
    args = ["--config", str(sweep.base.resolve())] if sweep.base else []
    args += run.override_args()
    args += [f"log.dir={sweep.runs_dir.resolve()}", f"log.name={run.id}",
             f"log.wandb_group={sweep.name}", f"log.tags={yaml_scalar(run.tags())}"]
    if "log.progress" not in run.overrides:
        args.append("log.progress=false")  # one progress bar: the sweep's
    if "train.resume" not in run.overrides:
        # A run stopped half-way continues from its newest checkpoint (if it wrote any);
        # prepare() has moved away every folder of another config.
        args.append("train.resume=auto")
    if wandb is not None:
        args.append(f"log.wandb={wandb}")
    return args


def train_command(nproc: Optional[int] = None) -> List[str]:
    """How to start train.py here: plain python, or under torchrun with N processes."""
    script = REPO_ROOT / "train.py"
    entry = [str(script)] if script.is_file() else ["-m", "byzddp.cli"]
    if nproc:
        # --standalone picks a free port, so several torchrun runs can share the machine.
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", *entry]
    return [sys.executable, *entry]


def _move_stale(sweep: Sweep, run: Run) -> None:
    src = sweep.runs_dir / run.id
    old = safe(folder_hash(src) or "unknown")
    dest = sweep.out / "stale" / f"{run.id}-{old}"
    k = 1
    while dest.exists():
        dest = sweep.out / "stale" / f"{run.id}-{old}.{k}"
        k += 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dest))


def _run_env() -> dict:
    env = dict(os.environ)
    # K runs side by side: one thread each unless the user asked otherwise.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _stop(proc: subprocess.Popen) -> None:
    """End one run we started (its whole process group: torchrun and its workers)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_GRACE_S)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_sweep(sweep: Sweep, jobs: int = 1, nproc: Optional[int] = None,
              wandb: Optional[str] = None, command: Optional[List[str]] = None,
              progress: bool = True) -> List[str]:
    """Run every unfinished run, up to `jobs` at a time; return the ids of failed runs.

    `command` replaces the train.py command line (before the run's arguments).
    """
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give at least 1")
    from tqdm import tqdm

    command = list(command or train_command(nproc))
    # Plain `python train.py` runs fork from a server that imported torch once
    # (byzddp/sweep/forked.py); any other command, torchrun's included, is a subprocess.
    forked = command == [sys.executable, str(REPO_ROOT / "train.py")]
    todo = prepare(sweep)
    total, finished = len(sweep.runs), len(sweep.runs) - len(todo)
    logs = sweep.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sweep.runs_dir.mkdir(parents=True, exist_ok=True)
    env = _run_env()
    if forked:      # the fork server inherits this environment when it starts
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONUNBUFFERED"):
            os.environ.setdefault(key, env[key])
    live: Dict[str, subprocess.Popen] = {}       # run id -> its process, while it runs
    lock = threading.Lock()                     # guards `live` and the start of a process
    stopping = threading.Event()                # set on Ctrl-C: no run starts after it

    def launch(run: Run) -> Tuple[Optional[int], float]:
        """In a pool thread: start one run, wait for it; (exit status or None if never
        started, seconds it took)."""
        args = train_args(sweep, run, wandb)
        argv = command + args
        began_run = time.monotonic()
        with lock:
            if stopping.is_set():
                return None, 0.0
            log = open(logs / f"{run.id}.log", "w")
            log.write("$ " + shlex.join(argv) + "\n")   # forked: the command it stands for
            log.flush()
            if forked:
                proc = live[run.id] = ForkedRun(args, str(logs / f"{run.id}.log"))
            else:
                proc = live[run.id] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                       stdin=subprocess.DEVNULL, env=env,
                                                       start_new_session=True)
        try:
            return proc.wait(), time.monotonic() - began_run
        finally:
            log.close()
            with lock:
                live.pop(run.id, None)

    failed: List[str] = []
    # A live bar on a terminal; in a log file (Slurm, nohup) one plain line per run instead.
    bar = tqdm(total=total, initial=finished, desc=sweep.name, unit="run", dynamic_ncols=True,
               file=sys.stderr, disable=not (progress and sys.stderr.isatty()), mininterval=1.0)
    bar.set_postfix(failed=0)
    began = time.monotonic()
    ended = 0

    def say(text: str, always: bool = False) -> None:
        count = finished + ended
        rate = ended / (time.monotonic() - began)
        eta = _duration((total - count) / rate) if rate > 0 and count < total else "-"
        line = f"[{count}/{total}, {len(failed)} failed, ETA {eta}] {text}"
        if bar.disable:
            if progress or always:
                print(line, file=sys.stderr, flush=True)
        else:
            bar.write(line, file=sys.stderr)

    def settle(run: Run, code: int, seconds: float) -> None:
        took = _duration(seconds)
        if code == 0 and status(sweep, run) == "done":
            value = (read_summary(sweep.runs_dir / run.id) or {}).get(sweep.table["metric"])
            shown = f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "n/a"
            say(f"done {run.id}: {sweep.table['metric']} {shown} in {took}")
        else:
            why = f"exit status {code}" if code else "exit 0 without a matching summary.json"
            failed.append(run.id)
            say(f"FAILED {run.id}: {why} after {took}; log: {logs / (run.id + '.log')}", always=True)
        bar.update(1)
        bar.set_postfix(failed=len(failed))

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="sweep-run")
    futures: List[Tuple[Future, Run]] = []
    try:
        futures = [(pool.submit(launch, run), run) for run in todo]   # started in this order
        pending = {f for f, _ in futures}
        while pending:
            # A timeout, so that Ctrl-C is seen within a second even when the kernel hands
            # SIGINT to a pool thread (a blocked wait in the main thread would miss it).
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut, run in futures:
                if fut in done:
                    ended += 1
                    settle(run, *fut.result())
    except BaseException:   # Ctrl-C (or a run that could not start): end what we started
        stopping.set()
        for fut, _ in futures:
            fut.cancel()
        with lock:
            procs = list(live.values())
        for proc in procs:
            _stop(proc)
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
    return failed


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def write_run_list(sweep: Sweep, wandb: Optional[str] = None) -> Tuple[Path, int]:
    """runs.txt: line i = the shell-quoted train.py arguments of unfinished run i (a Slurm
    array task i runs line i + 1: slurm/array.sbatch)."""
    lines = [shlex.join(train_args(sweep, r, wandb)) for r in prepare(sweep)]
    path = sweep.out / "runs.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    run_io.write_atomic(path, "".join(line + "\n" for line in lines))
    return path, len(lines)
