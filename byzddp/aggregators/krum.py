"""Krum-type rules, which select rows by Krum scores: Krum, Multi-Krum and Bulyan.

Ties go to the lowest row index (docs/design.md, "Tie-breaking").
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from byzddp.aggregators.base import Aggregator
from byzddp.aggregators.sorting import mean_closest_to_median, sorted_blocks
from byzddp.geometry import Columns, pairwise_squared_distances


def lowest_first(score: Tensor, tier: Tensor) -> Tensor:
    """Row order by (tier, score), ties to the lowest index. Tier 0 rows (good) come before
    tier 1 (bad) and tier 2 (already taken) whatever their scores, even infinite ones."""
    big = torch.finfo(score.dtype).max
    by_score = torch.sort(score.clamp(max=big), stable=True).indices
    return by_score[torch.sort(tier[by_score], stable=True).indices]


def krum_scores(dist: Tensor, f: int, alive: Optional[Tensor] = None, r: Optional[int] = None) -> Tensor:
    """Krum score of each row among the r `alive` rows (default: all): the sum of the squared
    distances to its r-f-2 nearest other alive rows, that count clamped to [1, r-1] outside the
    theory; rows not alive score +Inf."""
    n = dist.shape[0]
    others = dist.clone() if alive is None else dist.masked_fill(~alive[None, :], math.inf)
    others.fill_diagonal_(math.inf)
    r = n if r is None else r
    k = min(max(r - f - 2, 1), r - 1)
    if k < 1:  # a single row left: its score does not matter
        score = torch.zeros(n, dtype=dist.dtype, device=dist.device)
    else:
        score = torch.topk(others, k, dim=1, largest=False).values.sum(dim=1)
    return score if alive is None else score.masked_fill(~alive, math.inf)


class Krum(Aggregator):
    """The row with the lowest Krum score (lowest index among equal scores)."""
    name = "krum"

    @classmethod
    def requirements(cls, m: int, fp: int, params: dict) -> list:
        return [(2 * fp + 3 <= m, "2f'+3 <= m", f"2*{fp}+3={2 * fp + 3} > {m}", None)]

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        dist, good = pairwise_squared_distances(x, cols)
        order = lowest_first(krum_scores(dist, self.f), (~good).long())
        self.selected = order[:1]
        return x.index_select(0, self.selected)[0]


class MultiKrum(Aggregator):
    """The mean of the m rows with the lowest Krum scores (default m = rows - f)."""
    name = "multikrum"
    params = ("m",)

    def __init__(self, f: int = 0, m: Optional[int] = None) -> None:
        super().__init__(f)
        self.m = m

    @classmethod
    def resolve(cls, given: dict, m: int, fp: int) -> dict:
        params = super().resolve(given, m, fp)
        params.setdefault("m", max(m - fp, 1))
        return params

    @classmethod
    def requirements(cls, m: int, fp: int, params: dict) -> list:
        k = params["m"]
        return Krum.requirements(m, fp, params) + [
            (k <= m - fp, "aggregator.m <= m-f'", f"aggregator.m={k} > {m}-{fp}", f"lower aggregator.m to {max(m - fp, 1)}")]

    @classmethod
    def impossible(cls, m: int, params: dict) -> Optional[tuple]:
        if params["m"] > m:
            return ("aggregator.m", f"multikrum averages m={params['m']} vectors but sees only {m}; "
                                    f"lower aggregator.m")
        return None

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        n = x.shape[0]
        m = n - self.f if self.m is None else self.m
        m = min(max(m, 1), n)
        dist, good = pairwise_squared_distances(x, cols)
        order = lowest_first(krum_scores(dist, self.f), (~good).long())
        self.selected = order[:m]
        out = x.new_empty(x.shape[1])
        for c in cols.chunks():
            out[c] = x[:, c].index_select(0, self.selected).mean(dim=0)
        return out


class Bulyan(Aggregator):
    """Krum picks theta = m-2f rows one by one; per coordinate the mean of the beta = theta-2f
    picked values closest to their median (clamped to >= 1 outside the theory)."""
    name = "bulyan"
    exempt = {"permutation": "its last Krum rounds score each row by its distance to its k = r-f-2 nearest (k = 1 at "
                             "f = 2): two mutually nearest rows tie exactly and the tie goes to the lower index"}

    @classmethod
    def requirements(cls, m: int, fp: int, params: dict) -> list:
        return [(4 * fp + 3 <= m, "4f'+3 <= m", f"4*{fp}+3={4 * fp + 3} > {m}", None)]

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        n = x.shape[0]
        theta = max(n - 2 * self.f, 1)
        beta = max(theta - 2 * self.f, 1)
        dist, good = pairwise_squared_distances(x, cols)
        alive = torch.ones(n, dtype=torch.bool, device=x.device)
        tier = (~good).long()
        picks = []
        # theta rounds of Krum on the n x n distances (no pass over the data), each on the rows left.
        for taken in range(theta):
            score = krum_scores(dist, self.f, alive, n - taken)
            pick = lowest_first(score, torch.where(alive, tier, 2))[0]
            picks.append(pick)
            alive[pick] = False
        self.selected = torch.stack(picks)
        out = x.new_empty(x.shape[1])
        for cols_, s in sorted_blocks(x, cols, index=self.selected):
            out[cols_] = mean_closest_to_median(s[:theta].to(torch.float64), beta).to(x.dtype)
        return out


