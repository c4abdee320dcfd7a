"""Norm clipping of rows, the arithmetic behind the `arc` and `clipping` pre-aggregations
(`byzddp.resampling`): float64 row norms over the column grid, and the scale of each row.

A row's squared norm is the sum, in chunk order, of its per-chunk float64 sums of squares
(`byzddp.geometry.Columns.total`), so a rank's slice under sharded aggregation sees bit for bit
the norms of the whole call, and every rank clips its columns of a row by the same factor.

A non-finite row (NaN/Inf entries, which a Byzantine worker may send) is left as it is: it
stays non-finite and the rule copes with it, as with any bad row. For ARC it counts as the
largest norm, as a huge finite row would: it takes one of the k clipped places and so never
drags the threshold of the others up or down (docs/design.md, "Non-finite rows").
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from byzddp.geometry import Columns, columns_of


def row_norms(x: Tensor, columns: Optional[Columns] = None) -> tuple:
    """(norms, good): the float64 Euclidean norm of every row and the finite rows' mask; a
    non-finite row's norm is +Inf."""
    cols = columns_of(x, columns)
    partials = [x[:, c].to(torch.float64).contiguous().square().sum(dim=1) for c in cols.chunks()]
    sq = cols.total(partials, torch.zeros(x.shape[0], dtype=torch.float64, device=x.device))
    good = torch.isfinite(sq)
    return torch.where(good, sq, torch.full_like(sq, math.inf)).sqrt(), good


def clipped(x: Tensor, norms: Tensor, good: Tensor, threshold: Tensor) -> Tensor:
    """Every finite row whose norm exceeds `threshold` scaled to norm `threshold` (the factor in
    float64, rounded once to x's dtype), the rest, bad rows included, bit for bit unchanged
    (a factor of exactly 1). Elementwise, so a column slice gives the whole call's columns."""
    over = good & (norms > threshold)
    scale = torch.where(over, threshold / torch.where(over, norms, torch.ones_like(norms)),
                        torch.ones_like(norms))
    return x * scale.to(x.dtype)[:, None]


def arc_count(n: int, f: int) -> int:
    """k = floor(2 (f/n) (n - f)), the rows ARC clips (Allouah et al. 2024), in integers: the
    float product 2 f / n * (n - f) can land just below a whole number."""
    return (2 * f * (n - f)) // n


def arc_threshold(norms: Tensor, k: int) -> Tensor:
    """The (k+1)-th largest norm (bad rows at +Inf count among the largest); +Inf when k >= n."""
    if k >= norms.numel():
        return torch.full((), math.inf, dtype=norms.dtype, device=norms.device)
    return torch.sort(norms, descending=True).values[k]
