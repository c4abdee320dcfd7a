#!/usr/bin/env python
"""Entry point: `python train.py [--config PATH] [dotted.key=value ...]`, or under torchrun."""
import sys

from byzddp.cli import main

if __name__ == "__main__":
    sys.exit(main())
