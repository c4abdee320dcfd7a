#!/usr/bin/env python
"""Entry point: `python train.py [--config PATH] [dotted.key=value ...]`, or under torchrun."""
import os
import sys

from byzddp.cli import main

if __name__ == "__main__":
    code = main()
    # Every output is written and the process group is left by now. Skipping the interpreter's
    # finalization keeps gloo's worker threads, still holding tensors, from aborting a run that
    # succeeded (SIGABRT while Python tears down; it depends on timing, so it was rare).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
