"""Centered clipping (Karimireddy et al. 2021), the one rule that keeps state between steps."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from byzddp.aggregators.base import Aggregator, honest_majority
from byzddp.geometry import Columns, gram_matrix, weighted_sum


class CenteredClipping(Aggregator):
    """L steps c <- c + (1/m) sum_i clip_tau(g_i - c) from the previous call's centre; a
    non-finite row takes a zero step (it still counts in the 1/m). The centre moves on only when
    the aggregate is finite. Under sharded aggregation each rank keeps its slice of the centre."""
    name = "cclip"
    params = ("tau", "L")
    stateful = True
    exempt = {
        "identical": "clipping is absolute: from the centre 0, L steps of at most tau reach g only when ||g|| <= L tau",
        "translation": "clipping around a centre carried from the previous call (0 at first) and an absolute radius tau",
    }

    def __init__(self, f: int = 0, tau: float = 10.0, L: int = 3) -> None:
        super().__init__(f)
        self.tau, self.L = tau, L
        self.centre: Optional[Tensor] = None
        self._proposal: Optional[tuple] = None

    @classmethod
    def requirements(cls, m: int, fp: int, params: dict) -> list:
        return [honest_majority(m, fp)]

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        n, d = x.shape
        if self.centre is None:
            c0 = x.new_zeros(d)
        elif self.centre.shape != (d,):
            raise ValueError(f"aggregator cclip: the carried centre has {self.centre.numel()} "
                             f"coordinates but the rows have {d}")
        else:
            c0 = self.centre.to(device=x.device, dtype=x.dtype)
        # c stays a combination a c0 + w^T x, so ||g_i - c||^2 = G_ii - 2 (G w)_i - 2a p_i
        # + w^T G w + 2a w^T p + a^2 q with p = x c0 and q = ||c0||^2: one float64 product,
        # the L steps on n x n numbers, and c itself at the end.
        gram, good, p, q = gram_matrix(x, c0, columns=cols)
        norms = gram.diagonal()
        a = torch.ones((), dtype=torch.float64, device=x.device)
        w = torch.zeros_like(norms)
        for _ in range(self.L):
            gw = gram @ w
            sq = norms - 2 * gw - 2 * a * p + w @ gw + 2 * a * (w @ p) + a * a * q
            scale = (self.tau / sq.clamp_min(0).sqrt()).clamp(max=1.0)  # distance 0: inf -> 1
            scale = torch.where(good, scale, torch.zeros_like(scale))     # a bad row takes no step
            keep = 1 - scale.sum() / n
            a, w = a * keep, w * keep + scale / n
        c = a.to(x.dtype) * c0 + weighted_sum(w, x, good, cols)
        self._proposal = (c, c0)
        return c

    def settle(self, finite: Tensor) -> None:
        if self._proposal is None:
            return
        c, c0 = self._proposal
        self._proposal = None
        self.centre = torch.where(finite, c, c0)  # on the device: no host sync

    def state_dict(self) -> dict:
        return {} if self.centre is None else {"centre": self.centre.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - {"centre"}
        if unknown:
            raise ValueError(f"aggregator cclip: unknown state keys {sorted(unknown)}")
        centre = state.get("centre")
        self.centre = None if centre is None else centre.detach().clone()


