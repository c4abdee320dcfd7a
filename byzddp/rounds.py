"""Who takes part in a round (workers.participation) and how many rows the rule then sees.

With participation q < 1 each round draws round(q n) of the n workers from a stream keyed by
(seed, step), the same on every rank and for any number of ranks; Byzantine workers are in
the same draw (an attacker that is not drawn sends nothing that round). The rule sees only
the drawn workers' rows, so it is built for m = round(q n) workers, and its requirement is
checked for the worst round the declared f allows: all f Byzantine workers drawn.
The config is duck-typed: this module never imports byzddp.config.
"""
from __future__ import annotations

import math
from typing import List

import torch

from byzddp import streams


def per_round(n: int, q: float) -> int:
    """round(q n) workers a round, half rounded up, at least one."""
    return max(1, min(n, math.floor(q * n + 0.5)))


def workers_per_round(cfg) -> int:
    return per_round(cfg.workers.n, cfg.workers.participation)


def participants(cfg, step: int) -> List[int]:
    """The workers that take part in round `step`, ascending: all n when q = 1."""
    n, m = cfg.workers.n, workers_per_round(cfg)
    if m == n:
        return list(range(n))
    perm = torch.randperm(n, generator=streams.generator("participation", cfg.seed, step))
    return sorted(perm[:m].tolist())
