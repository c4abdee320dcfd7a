#!/usr/bin/env python
"""Entry point: `python train.py [--config PATH] [dotted.key=value ...]`, or under torchrun."""
from byzddp.start import command_line

if __name__ == "__main__":
    command_line()
