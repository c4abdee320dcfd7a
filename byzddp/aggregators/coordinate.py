"""Coordinate-wise rules: the mean, the coordinate-wise median, the trimmed mean and the mean
around the median."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from byzddp.aggregators.base import Aggregator, honest_majority
from byzddp.aggregators.sorting import mean_closest_to_median, sorted_blocks, sum_rows
from byzddp.geometry import Columns


class Mean(Aggregator):
    """The arithmetic mean: optimal without attackers, broken by a single bad row."""
    name = "mean"
    exempt = {"bounded": "the mean is not robust: one row of 1e30 moves it by 1e30/m (the baseline rule)"}

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

    @classmethod
    def requirements(cls, m: int, fp: int, params: dict) -> list:
        return [honest_majority(m, fp)]

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        n = x.shape[0]
        lo, hi = (n - 1) // 2, n // 2
        out = x.new_empty(x.shape[1])
        for c, s in sorted_blocks(x, cols, wanted=(lo, hi)):
            if lo == hi:
                out[c] = s[lo]
            else:
                torch.add(s[lo], s[hi], out=out[c]).div_(2)
        return out


class TrimmedMean(Aggregator):
    """Per coordinate, drop the b largest and the b smallest values and average the rest."""
    name = "trimmed_mean"
    params = ("b",)

    def __init__(self, f: int = 0, b: Optional[int] = None) -> None:
        super().__init__(f)
        self.b = b

    @classmethod
    def resolve(cls, given: dict, m: int, fp: int) -> dict:
        params = super().resolve(given, m, fp)
        # Default b = f', kept computable (2b < m) when an expert runs outside the guarantee.
        params.setdefault("b", min(fp, (m - 1) // 2))
        return params

    @classmethod
    def requirements(cls, m: int, fp: int, params: dict) -> list:
        b = params["b"]
        fix = f"raise aggregator.b to {fp}" if 2 * fp < m else None
        return [(b >= fp, "b >= f'", f"b={b} < {fp}", fix)]

    @classmethod
    def impossible(cls, m: int, params: dict) -> Optional[tuple]:
        b = params["b"]
        if 2 * b >= m:
            return ("aggregator.b", f"trimmed_mean with b={b} trims all of the {m} vectors it sees "
                                    f"(needs 2b < m); lower aggregator.b")
        return None

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        n = x.shape[0]
        b = self.f if self.b is None else self.b
        if 2 * b >= n:
            raise ValueError(f"aggregator trimmed_mean: b={b} trims all of the {n} rows; needs 2b < {n}")
        out = x.new_empty(x.shape[1])
        for c, s in sorted_blocks(x, cols):
            out[c] = sum_rows(s[b:n - b]) / (n - 2 * b)
        return out


class MeanAroundMedian(Aggregator):
    """Per coordinate, the mean of the m-f values closest to the median (Xie et al. 2018,
    "mean around median"); the median of an even count is the mean of the two middle values
    (as cm), and among values equally far from it the smaller ones are kept."""
    name = "meamed"

    @classmethod
    def requirements(cls, m: int, fp: int, params: dict) -> list:
        return [honest_majority(m, fp)]

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        n = x.shape[0]
        k = n - self.f
        if k < 1:
            raise ValueError(f"aggregator meamed: f={self.f} leaves no values among {n} rows")
        out = x.new_empty(x.shape[1])
        for c, s in sorted_blocks(x, cols):
            out[c] = mean_closest_to_median(s[:n].to(torch.float64), k).to(x.dtype)
        return out
