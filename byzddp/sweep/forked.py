"""Plain-python runs forked from one process that has imported torch once.

Starting `python train.py` costs about 4 s here before the first step, almost all of it
importing torch: more than a short run's training. A sweep of plain runs therefore starts
its runs from a fork server (`multiprocessing`'s forkserver, with torch and the trainer
preloaded): each run is a fresh child process, forked from that clean single-threaded server,
in its own session with its output in its log file, as a `train.py` subprocess would be. A
run's bits do not change: the child reads its config, seeds and thread count as train.py does.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from typing import List, Optional

PRELOAD = ["torch", "byzddp.cli", "byzddp.trainer"]
_context = None


def _fork_server():
    """The forkserver context, started (lazily, once per sweep process) with the preloads. The
    server inherits this process's environment when it starts: set it before."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(args: List[str], log_path: str) -> None:
    """In the forked child: its own session (the sweep stops a run with its process group),
    stdout and stderr into the log, then train.py's main and train.py's exit."""
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = ["train.py", *args]
    code = 1
    try:
        from byzddp.cli import main
        code = main(args)
    except SystemExit as e:        # argparse's --help and usage errors
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:          # a crash: its traceback into the log, as a subprocess's
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)             # as train.py: no interpreter teardown after the run


class ForkedRun:
    """One run forked from the server; waits and stops like a `subprocess.Popen`."""

    def __init__(self, args: List[str], log_path: str) -> None:
        self.process = _fork_server().Process(target=_child, args=(list(args), str(log_path)), daemon=False)
        self.process.start()
        self.pid = self.process.pid

    def wait(self, timeout: Optional[float] = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"run {self.pid}", timeout)
        return self.process.exitcode
