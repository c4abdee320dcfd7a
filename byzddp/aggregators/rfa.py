"""The geometric median by smoothed Weiszfeld iterations (RFA, Pillutla et al. 2019)."""
from __future__ import annotations

import torch
from torch import Tensor

from byzddp.aggregators.base import Aggregator, honest_majority
from byzddp.geometry import Columns, gram_matrix, weighted_sum


class RFA(Aggregator):
    """Smoothed Weiszfeld iterations for the geometric median, from z = 0, equal weights;
    a non-finite row gets weight zero."""
    name = "rfa"
    exempt = {"translation": "Weiszfeld starts at z = 0 and stops after T steps (T = 1: the normalized mean), so the "
                             "output depends on the origin; only its limit, the geometric median, is equivariant"}
    params = ("T", "nu")

    def __init__(self, f: int = 0, T: int = 8, nu: float = 0.1) -> None:
        super().__init__(f)
        self.T, self.nu = T, nu

    @classmethod
    def requirements(cls, m: int, fp: int, params: dict) -> list:
        return [honest_majority(m, fp)]

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        # z is always a combination w^T x of the rows, so ||z - g_i||^2 = G_ii - 2 (G w)_i
        # + w^T G w comes from one float64 Gram matrix: the T iterations run on n x n numbers,
        # and the data is read twice (the product, then z). No finite row: the weights are
        # 0/0 = NaN and so is z.
        gram, good, _, _ = gram_matrix(x, columns=cols)
        norms = gram.diagonal()
        w = torch.zeros_like(norms)  # z = 0
        for _ in range(self.T):
            gw = gram @ w
            dist = (norms - 2 * gw + w @ gw).clamp_min(0).sqrt()
            beta = torch.where(good, 1.0 / dist.clamp_min(self.nu), torch.zeros_like(dist))
            w = beta / beta.sum()
        return weighted_sum(w, x, good, cols)


