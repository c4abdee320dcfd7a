"""The command line's first step (train.py, the byzddp-train script): import the harness, and
make a Ctrl-C that lands during that import one line and exit 130.

Importing torch takes seconds (longer on a cold or shared file system), and a Ctrl-C then would
otherwise end in a traceback from inside torch. Nothing has run or been written at that point.
This module imports nothing heavy, so that it is in place before the import it guards.
"""
import os
import signal
import sys


def command_line() -> None:
    try:
        from byzddp.cli import command_line as run
    except KeyboardInterrupt:
        rank = os.environ.get("RANK")
        who = f"rank {rank}: " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"error: {who}interrupted while starting (importing torch); nothing was run or written",
              file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    run()
