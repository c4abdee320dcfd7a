"""Coordinate-wise rules: the mean, the coordinate-wise median and the trimmed mean."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from byzddp.aggregators.base import Aggregator
from byzddp.aggregators.sorting import column_blocks, sorted_block, sum_rows
from byzddp.geometry import Columns


class Mean(Aggregator):
    """The arithmetic mean: optimal without attackers, broken by a single bad row."""
    name = "mean"

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        # Chunk by chunk of the grid, straight into the output: a reduction's order can
        # depend on the width it is given, so a slice and the whole call use the same widths.
        out = x.new_empty(x.shape[1])
        for c in cols.chunks():
            torch.mean(x[:, c], dim=0, out=out[c])
        return out

    def _non_finite_message(self, m: int) -> str:
        return ("aggregator mean: an input row holds NaN/Inf and the mean cannot exclude it; "
                "use a robust rule (cm, krum, rfa, cclip, ...) or find the worker that diverged")



class CoordinateMedian(Aggregator):
    """Per coordinate the median; the mean of the two middle values when the row count is even."""
    name = "cm"

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        n = x.shape[0]
        lo, hi = (n - 1) // 2, n // 2
        out = x.new_empty(x.shape[1])
        for c in column_blocks(n, x, cols):
            s = sorted_block(x[:, c], wanted=(lo, hi))
            out[c] = s[lo] if lo == hi else (s[lo] + s[hi]) / 2
        return out


class TrimmedMean(Aggregator):
    """Per coordinate, drop the b largest and the b smallest values and average the rest."""
    name = "trimmed_mean"
    params = ("b",)

    def __init__(self, f: int = 0, b: Optional[int] = None) -> None:
        super().__init__(f)
        self.b = b

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        n = x.shape[0]
        b = self.f if self.b is None else self.b
        if 2 * b >= n:
            raise ValueError(f"aggregator trimmed_mean: b={b} trims all of the {n} rows; needs 2b < {n}")
        out = x.new_empty(x.shape[1])
        for c in column_blocks(n, x, cols):
            out[c] = sum_rows(sorted_block(x[:, c])[b:n - b]) / (n - 2 * b)
        return out


