"""Optimal ALIE and IPM: the ALIE and IPM attacks with their scale chosen each step against the
run's own robust pipeline (the idea of ByzFL's Optimal_ALittleIsEnough and
Optimal_InnerProductManipulation; written here, with a different search).

Each step the colluders all_gather every row, then choose the scale t in [0, attack.search_max]
that maximises ||pipeline(honest rows + f copies of the forged vector) - honest mean||, where the
pipeline is the run's pre-aggregation and rule (Attack.needs_pipeline: the trainer hands the
attacker its own copy) and the forged vector is mu - t*sigma (ALIE, t = z) or -t*mu (IPM,
t = epsilon). The attacker knows the rule, f and the rule's state (cclip's centre is the previous
update) but not the server's random draw: the pre-aggregation draws from the attacker's own
stream keyed by (seed, step) (base.pipeline_on). Every rank computes on the same gathered
tensor with the same operations, so the chosen scale is the same on every rank and for any
number of ranks.

The search (`line_search`), deterministic: a uniform grid of ceil(evals/2) points on
[0, search_max] (both ends included), then golden-section refinement with the remaining
evaluations on the two grid cells around the grid's best; the best point tried wins, ties to
the smallest scale. ByzFL instead starts at 0 and doubles a step while the objective grows, then
contracts it by a ratio; a fixed grid first does not stop at the first decrease, so a
rule whose response to the scale is not monotone (Krum) is still searched over the whole range.
"""
from __future__ import annotations

import math
from typing import Callable, Tuple

import torch

from byzddp.attacks.base import Attack, everyone_to_forge, pipeline_on
from byzddp.errors import ConfigError

GOLDEN = (math.sqrt(5) - 1) / 2


def line_search(objective: Callable[[float], float], top: float, evals: int) -> Tuple[float, float]:
    """(t, objective(t)) with the largest objective among the points tried in [0, top]: a grid of
    ceil(evals/2) points, then golden-section steps on [t_k - h, t_k + h] around the grid's best
    t_k (h the grid step) with the evaluations left. Ties go to the smallest t."""
    tried = []

    def f(t: float) -> float:
        value = objective(t)
        tried.append((t, value))
        return value

    points = max(3, (evals + 1) // 2)
    step = top / (points - 1)
    values = [f(top * i / (points - 1)) for i in range(points)]
    k = max(range(points), key=lambda i: (values[i], -i))
    a, b = max(0.0, top * (k - 1) / (points - 1)), min(top, top * (k + 1) / (points - 1))
    left = evals - points
    if left >= 2 and step > 0:
        x1, x2 = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
        f1, f2 = f(x1), f(x2)
        left -= 2
        while left > 0:     # keep the sub-bracket around the better interior point
            if f1 >= f2:
                b, x2, f2 = x2, x1, f1
                x1 = b - GOLDEN * (b - a)
                f1 = f(x1)
            else:
                a, x1, f1 = x1, x2, f2
                x2 = a + GOLDEN * (b - a)
                f2 = f(x2)
            left -= 1
    return max(tried, key=lambda tv: (tv[1], -tv[0]))


class OptimalScale(Attack):
    """Send base + t * direction with t chosen by `line_search` against the run's pipeline."""
    params = ("search_max", "search_evals")
    needs_gradient = False
    needs_pipeline = True
    needs_previous = True       # a stateful rule (cclip) is modelled from the previous update
    min_honest = 2

    def __init__(self, search_max: float = 10.0, search_evals: int = 20):
        self.search_max, self.search_evals = search_max, search_evals
        self.scale = None       # the last scale chosen (for inspection; recomputed every step)

    @classmethod
    def check_values(cls, search_max=10.0, search_evals=20, **_):
        if not (isinstance(search_max, (int, float)) and 0 < search_max < math.inf):
            raise ConfigError(f"config key attack.search_max: must be a finite number > 0, got {search_max}")
        if not isinstance(search_evals, int) or isinstance(search_evals, bool) or search_evals < 3:
            raise ConfigError(f"config key attack.search_evals: must be an integer >= 3, got {search_evals}")

    def line(self, g: torch.Tensor, mean: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(base, direction) of the forged vectors base + t * direction, from the honest rows g."""
        raise NotImplementedError

    def forge(self, ctx):
        rows = everyone_to_forge(ctx)
        if rows is None:
            return
        device = rows.device
        g = rows.index_select(0, torch.tensor(ctx.honest, device=device)).to(torch.float64)
        mean = g.mean(0)
        base, direction = self.line(g, mean)
        byzantine = torch.tensor(ctx.byzantine, device=device)

        def distance(t: float) -> float:
            sent = rows.clone()
            sent[byzantine] = (base + t * direction).to(rows.dtype)
            aggregate, _ = pipeline_on(ctx, sent)
            return float(torch.linalg.vector_norm(aggregate.to(torch.float64) - mean))

        self.scale, _ = line_search(distance, float(self.search_max), self.search_evals)
        ctx.send(base + self.scale * direction)


class OptimalALIE(OptimalScale):
    """ALIE's mu - z*sigma (honest mean and sample std, as `alie`) with z chosen each step."""
    name = "optimal_alie"

    def line(self, g, mean):
        return mean, -g.std(0)


class OptimalIPM(OptimalScale):
    """IPM's -epsilon*mu (honest mean, as `ipm`) with epsilon chosen each step."""
    name = "optimal_ipm"
    min_honest = 1

    def line(self, g, mean):
        return torch.zeros_like(mean), -mean
