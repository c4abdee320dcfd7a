"""The adaptive attack: every step the Byzantine workers try the vectors of several attack
families against the run's own pipeline and send the one that moves the aggregate farthest
from the honest mean (the leaderboard's worst case over families, taken by the adversary at
each step instead of by the table after the run).

Candidates (`candidates`), in this order, each one evaluation of the attacker's copy of the
pipeline (base.pipeline_on, as optimal_alie):
    alie       mu - z sigma          z in {ALIE's own z from (n, f)} + the scale grid
    ipm        -epsilon mu           epsilon in {ipm's default 0.1} + the scale grid
    signflip   -t g_i (own vector)   t in {1 (bitflip)} + the scale grid
    mimic      a copy of honest g_j  j: the `attack.grid` honest workers farthest from mu along the
                                     honest vectors' top variance direction (mimic's criterion,
                                     without the warm-up: chosen afresh each step)
    minmax     minmax's vector       its own gamma (the largest that stays in the honest spread)
    minsum     minsum's vector       likewise
The scale grid: `attack.grid` values search_max / 2**k, k = grid-1, ..., 0 (geometric: the
families' useful scales span orders of magnitude, ALIE's z below 1, IPM's epsilon near the
mean's size and beyond). So 4 * grid + 5 evaluations a step (21 at the default grid = 4), and
each family's own default vector is among them: per step the choice moves the attacker's model
of the aggregate at least as far as alie, ipm, bitflip, minmax and minsum do.

What the choice maximises is attack.objective: `distance`, ||aggregate - honest mean|| (ByzFL's
optimal attacks' objective), or `alignment`, -<aggregate, honest mean>/||honest mean||: the
component of the update against the honest descent direction. A far aggregate is not always a
harmful one (a copy of an extreme honest worker is far from the mean yet still descends), so
the two can choose differently; docs/attacks.md compares them in training.

The vector formulas are the families' own (optimal.OptimalALIE/OptimalIPM.line, MinMax.malicious,
MinSum.malicious, alie_z). Every rank gathers the same rows and runs the same operations on them,
so the choice, and the bits sent, are the same on any number of ranks. Ties go to the first
candidate in the order above.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import torch

from byzddp.attacks.base import Attack, everyone_to_forge, pipeline_on
from byzddp.attacks.omniscient import IPM, MinMax, MinSum, alie_z
from byzddp.attacks.optimal import OptimalALIE, OptimalIPM, OptimalScale
from byzddp.errors import ConfigError

FAMILIES = ("alie", "ipm", "signflip", "mimic", "minmax", "minsum")

# What the attackers maximise, from the aggregate and the honest mean (float64): the distance
# between them (the and ByzFL's objective), or how far the aggregate falls short of the
# honest mean's direction, -<aggregate, mean>/||mean|| (the descent it undoes, IPM's aim).
OBJECTIVES = {
    "distance": lambda out, mean: float(torch.linalg.vector_norm(out - mean)),
    "alignment": lambda out, mean: float(-(out @ mean) / torch.linalg.vector_norm(mean).clamp_min(1e-300)),
}

# A candidate: (family, its parameter, rows -> the (f, d) Byzantine rows it sends)
Candidate = Tuple[str, float, Callable[[], torch.Tensor]]


def scale_grid(top: float, points: int) -> List[float]:
    """`points` scales top / 2**k, k = points-1 down to 0 (ascending)."""
    return [top / 2 ** k for k in range(points - 1, -1, -1)]


def mimic_targets(g: torch.Tensor, k: int) -> List[int]:
    """The k honest rows (indices into g) farthest from the mean along the top principal direction
    of the centred rows, farthest first (ties: the lower index). The projection of row j on that
    direction is sqrt(lambda) v_j with (lambda, v) the top eigenpair of the h x h Gram matrix of the
    centred rows, so only |v_j| is needed."""
    centred = g - g.mean(0)
    v = torch.linalg.eigh(centred @ centred.T).eigenvectors[:, -1]
    order = sorted(range(g.shape[0]), key=lambda j: (-abs(float(v[j])), j))
    return order[:k]


def candidates(rows: torch.Tensor, honest: List[int], byzantine: List[int], grid: int,
               top: float) -> List[Candidate]:
    """Every candidate of one step, from all n rows (the Byzantine rows hold their own
    honest-looking vectors, which signflip negates)."""
    device = rows.device
    g = rows.index_select(0, torch.tensor(honest, device=device)).to(torch.float64)
    mean = g.mean(0)
    own = rows.index_select(0, torch.tensor(byzantine, device=device)).to(torch.float64)
    f, n = len(byzantine), len(honest) + len(byzantine)
    scales = scale_grid(top, grid)
    out: List[Candidate] = []

    def line(family, base, direction, values):
        for t in values:
            out.append((family, t, lambda t=t: (base + t * direction).expand(f, -1)))

    alie_base, alie_dir = OptimalALIE().line(g, mean)
    try:
        own_z = [alie_z(n, f)]
    except ConfigError:     # (n, f) for which ALIE defines no z
        own_z = []
    line("alie", alie_base, alie_dir, own_z + scales)
    ipm_base, ipm_dir = OptimalIPM().line(g, mean)
    line("ipm", ipm_base, ipm_dir, [IPM().epsilon] + scales)
    for t in [1.0] + scales:
        out.append(("signflip", t, lambda t=t: -t * own))
    for j in mimic_targets(g, min(grid, g.shape[0])):
        out.append(("mimic", float(honest[j]), lambda j=j: g[j].expand(f, -1)))
    for family, cls in (("minmax", MinMax), ("minsum", MinSum)):
        out.append((family, math.nan, lambda cls=cls: cls().malicious(g).expand(f, -1)))
    return out


class Adaptive(Attack):
    """Each step the candidate (of `candidates`) that maximises the objective (attack.objective,
    OBJECTIVES) of the pipeline's output on the rows sent: by default ||output - honest mean||."""
    name = "adaptive"
    params = ("search_max", "grid", "objective")
    needs_gradient = True       # signflip negates the Byzantine worker's own vector
    needs_pipeline = True
    needs_previous = True       # a stateful rule (cclip) is modelled from the previous update
    min_honest = 2              # ALIE's sample std

    def __init__(self, search_max: float = 10.0, grid: int = 4, objective: str = "distance"):
        self.search_max, self.grid, self.objective = search_max, grid, objective
        self.choice = None                      # (family, parameter) of the last step
        self.counts: Dict[str, int] = {}        # steps each family was chosen (inspection only)

    @classmethod
    def check_values(cls, search_max=10.0, grid=4, objective="distance", **_):
        OptimalScale.check_values(search_max=search_max)
        if objective not in OBJECTIVES:
            raise ConfigError(f"config key attack.objective: '{objective}' is not one of {', '.join(OBJECTIVES)}")
        if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
            raise ConfigError(f"config key attack.grid: must be an integer >= 1, got {grid}")

    def forge(self, ctx):
        rows = everyone_to_forge(ctx)
        if rows is None:
            return
        honest = ctx.honest
        mean = rows[honest].to(torch.float64).mean(0)
        byzantine = torch.tensor(ctx.byzantine, device=rows.device)
        best, best_harm, best_sent = None, -math.inf, None
        for family, value, make in candidates(rows, honest, ctx.byzantine, self.grid, float(self.search_max)):
            sent = rows.clone()
            sent[byzantine] = make().to(rows.dtype)
            aggregate, _ = pipeline_on(ctx, sent)
            harm = OBJECTIVES[self.objective](aggregate.to(torch.float64), mean)
            harm = -math.inf if math.isnan(harm) else harm
            if best is None or harm > best_harm:    # ties: the earlier candidate
                best, best_harm, best_sent = (family, value), harm, sent
        self.choice = best
        self.counts[best[0]] = self.counts.get(best[0], 0) + 1
        for i in ctx.local_byzantine:
            ctx.rows[i].copy_(best_sent[ctx.workers[i]])
