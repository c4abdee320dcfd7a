"""Rules that average a subset of m-f rows: minimum diameter averaging (MDA), smallest maximum
eigenvalue averaging (SMEA), both exact over every subset, and MoNNA, the m-f rows nearest to a
designated honest worker's row.

Everything comes from the float64 squared distances of the rows (docs/design.md, "Distances from
a float64 Gram matrix"), so a column slice (`byzddp.sharded`) picks the same rows as the whole
call. A non-finite row is infinitely far from every row: a subset holding one has an infinite
diameter or eigenvalue, and MoNNA's designated row never has it among its m-f nearest, so up to f
bad rows never reach the output. Ties go to the lowest index: for MDA and SMEA the first subset in
lexicographic order (that of itertools.combinations) among equal values.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from byzddp.aggregators.base import Aggregator, honest_majority
from byzddp.geometry import Columns, pairwise_squared_distances

# MDA and SMEA look at every subset of m-f rows: C(m, m-f) of them. Near this many a call costs
# about 3 s (mda) and 30 s (smea: a k x k eigvalsh per subset) on one CPU thread (m = 60, f = 3);
# past it, far more (C(30, 15) = 1.6e8), so the rules refuse.
MAX_SUBSETS = 100_000

# Subsets examined per batch (bounds the (batch, k, k) float64 buffers to about 64 MiB).
_BATCH_ENTRIES = 1 << 23


def subset_count(m: int, f: int) -> int:
    return math.comb(m, max(m - f, 1))


def _too_many(name: str, m: int, f: int) -> Optional[str]:
    k = max(m - f, 1)
    count = math.comb(m, k)
    if count <= MAX_SUBSETS:
        return None
    return (f"{name} examines every subset of m-f={k} of the m={m} vectors (f={f}): C({m}, {k}) = {count} "
            f"subsets, above the limit of {MAX_SUBSETS} (byzddp.aggregators.subsets.MAX_SUBSETS)")


@lru_cache(maxsize=16)
def _subsets(m: int, k: int, device: torch.device) -> Tensor:
    """Every k-subset of range(m) as a (C(m, k), k) index, in lexicographic order (that of
    itertools.combinations), made once per (m, k, device)."""
    index = torch.tensor(list(itertools.combinations(range(m), k)), dtype=torch.long).view(-1, k)
    return index.to(device)


def _blocks(dist: Tensor, k: int):
    """(start, subsets, D[S, S]) for the subsets in batches; D[S, S] is (batch, k, k)."""
    m = dist.shape[0]
    index = _subsets(m, k, dist.device)
    step = max(1, _BATCH_ENTRIES // (k * k))
    for start in range(0, index.shape[0], step):
        s = index[start:start + step]
        yield start, s, dist[s[:, :, None], s[:, None, :]]


def _mean_of_rows(x: Tensor, rows: Tensor, cols: Columns) -> Tensor:
    """The mean of the selected rows, chunk by chunk of the grid (as Multi-Krum): a non-finite
    selected row makes the output non-finite, which the caller turns into NonFiniteError."""
    out = x.new_empty(x.shape[1])
    for c in cols.chunks():
        out[c] = x[:, c].index_select(0, rows).mean(dim=0)
    return out


class _SubsetRule(Aggregator):
    """The mean of the subset of m-f rows with the smallest `_values` (ties: the first subset)."""

    @classmethod
    def requirements(cls, m: int, fp: int, params: dict) -> list:
        return [honest_majority(m, fp)]

    @classmethod
    def impossible(cls, m: int, params: dict) -> Optional[tuple]:
        why = _too_many(cls.name, m, params["f"])
        if why:
            return ("workers.n", f"{why}; lower workers.n or workers.byzantine, or choose another rule")
        return None

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        m = x.shape[0]
        why = _too_many(self.name, m, self.f)
        if why:
            raise ValueError(f"aggregator {why}")
        k = max(m - self.f, 1)
        dist, _ = pairwise_squared_distances(x, cols)
        values = torch.empty(subset_count(m, self.f), dtype=torch.float64, device=x.device)
        for start, s, block in _blocks(dist, k):
            values[start:start + s.shape[0]] = self._values(block, k)
        best = torch.argmin(values)  # the first among equal values; every value +Inf: the first subset
        self.selected = _subsets(m, k, x.device)[best]
        return _mean_of_rows(x, self.selected, cols)

    def _values(self, block: Tensor, k: int) -> Tensor:
        raise NotImplementedError


class MinimumDiameterAveraging(_SubsetRule):
    """The mean of the m-f rows whose subset has the smallest diameter, the largest distance
    between two of its rows (El Mhamdi et al. 2018)."""
    name = "mda"
    exempt = {"permutation": "the diameter is one pair's distance, so every subset that keeps that pair and drops "
                             "the farther rows ties with the best; ties go to the subset of the lowest rows"}

    def _values(self, block: Tensor, k: int) -> Tensor:
        # Squared distances order subsets as distances do. A bad row's distances are +Inf (its
        # own too), so a subset holding one has an infinite diameter.
        return block.reshape(block.shape[0], -1).amax(dim=1)


class SmallestMaxEigenvalueAveraging(_SubsetRule):
    """The mean of the m-f rows whose empirical covariance (1/|S|) sum (x_i - mu_S)(x_i - mu_S)^T
    has the smallest largest eigenvalue (Allouah et al. 2023)."""
    name = "smea"

    def _values(self, block: Tensor, k: int) -> Tensor:
        # The covariance's nonzero eigenvalues are those of the centred k x k Gram matrix
        # K = -1/2 P D P (P = I - 11^T/k, D the squared distances) divided by k: exact on
        # m x m numbers, whatever d.
        bad = torch.isinf(block).flatten(1).any(dim=1)
        block = torch.where(torch.isinf(block), torch.zeros_like(block), block)
        centred = block - block.mean(dim=1, keepdim=True) - block.mean(dim=2, keepdim=True) \
            + block.mean(dim=(1, 2), keepdim=True)
        top = torch.linalg.eigvalsh(-0.5 * centred)[:, -1] / k
        return torch.where(bad, torch.full_like(top, math.inf), top.clamp_min(0))


class MoNNA(Aggregator):
    """The mean of the m-f rows nearest to the designated worker's row, itself included, the
    lower index first among equal distances (Farhadkhani et al. 2023). The designated worker
    must be honest, and row i must be worker i's vector: `byzddp.pipeline` checks both."""
    name = "monna"
    exempt = {"permutation": "it trusts the row at position `designated` (that worker's own vector): "
                             "reordering the rows changes whom it trusts"}
    params = ("designated",)

    def __init__(self, f: int = 0, designated: int = 0) -> None:
        super().__init__(f)
        self.designated = designated

    @classmethod
    def requirements(cls, m: int, fp: int, params: dict) -> list:
        return [honest_majority(m, fp)]

    @classmethod
    def impossible(cls, m: int, params: dict) -> Optional[tuple]:
        if params["designated"] >= m:
            return ("aggregator.designated", f"monna trusts row {params['designated']} but sees only "
                                             f"m={m} vectors; choose a worker between 0 and {m - 1}")
        return None

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        m = x.shape[0]
        if not 0 <= self.designated < m:
            raise ValueError(f"aggregator monna: the designated row {self.designated} is not one of the {m} rows")
        k = max(m - self.f, 1)
        dist, _ = pairwise_squared_distances(x, cols)
        # A bad row is +Inf away. The designated row comes first even when it is bad itself (every
        # distance +Inf): then the output is not finite and the call raises, rather than average
        # rows that nothing vouches for.
        key = dist[self.designated].clone()
        key[self.designated] = 0
        order = torch.sort(key, stable=True).indices
        self.selected = order[:k]
        return _mean_of_rows(x, self.selected, cols)
