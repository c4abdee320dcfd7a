"""Spectral filtering: the covariance-bound agnostic filter (CAF, Allouah, Guerraoui and Stephan,
ICML 2025), which down-weights rows along the top eigenvector of their weighted covariance.

Every step runs on the m x m float64 squared distances (docs/design.md, "Distances from a float64
Gram matrix"), the top eigenpair exact (eigh of an m x m matrix, not power iterations), so a
column slice (`byzddp.sharded`) computes the same weights as the whole call.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from byzddp.aggregators.base import Aggregator, honest_majority
from byzddp.geometry import Columns, pairwise_squared_distances, weighted_sum


def weighted_centred_gram(dist: Tensor, p: Tensor) -> Tensor:
    """K[i, j] = (x_i - mu).(x_j - mu) with mu = sum_k p_k x_k (p sums to 1), from the squared
    distances D alone: K = -1/2 (I - 1 p^T) D (I - p 1^T)."""
    dp = dist @ p
    return -0.5 * (dist - dp[:, None] - dp[None, :] + p @ dp)


class CovarianceAgnosticFilter(Aggregator):
    """Weights c_i = 1; while sum c > m - 2f: mu = weighted mean, (lambda, v) the top eigenpair of
    the weighted covariance sum_i c_i (x_i - mu)(x_i - mu)^T / sum c, tau_i = ((x_i - mu).v)^2,
    c_i <- c_i (1 - tau_i / tau_max) with tau_max the largest tau among rows still weighted. The
    output is the mu with the smallest lambda seen (the first among equals); with f = 0 the loop
    never runs and the output is the mean. A non-finite row has weight zero from the start; more
    such rows than f make the output NaN (the call raises NonFiniteError)."""
    name = "caf"

    @classmethod
    def requirements(cls, m: int, fp: int, params: dict) -> list:
        return [honest_majority(m, fp)]

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        m = x.shape[0]
        dist, good = pairwise_squared_distances(x, cols)
        dist = torch.where(good[:, None] & good[None, :], dist, torch.zeros_like(dist))
        c = good.to(torch.float64)
        threshold = m - 2 * self.f
        best_p = c / c.sum()
        best = torch.full((), math.inf, dtype=torch.float64, device=x.device)
        active = c.sum() > threshold
        # Each step zeroes the weight of a row with the largest tau, so after j steps at most
        # m - j rows weigh at most 1 each: 2f steps (m at most) always reach the stop. A fixed
        # count with an `active` flag keeps the loop on the device (no host sync).
        tiny = torch.finfo(torch.float64).tiny
        for _ in range(min(2 * self.f, m)):
            p = c / c.sum().clamp_min(tiny)  # no finite row: p = 0, a zero matrix (eigh refuses NaN)
            gram = weighted_centred_gram(dist, p)
            root = p.sqrt()
            values, vectors = torch.linalg.eigh(root[:, None] * gram * root[None, :])
            lam, u = values[-1].clamp_min(0), vectors[:, -1]
            # v = Y^T diag(root) u / sqrt(lam), so (x_i - mu).v = (K diag(root) u)_i / sqrt(lam).
            tau = (gram @ (root * u)) ** 2 / lam
            better = active & (lam < best)
            best = torch.where(better, lam, best)
            best_p = torch.where(better, p, best_p)
            tau = torch.where(c > 0, tau, torch.zeros_like(tau))
            tau_max = tau.max()
            # lambda = 0: every weighted row sits at mu; no later mu can do better, so stop.
            moving = active & (lam > 0) & (tau_max > 0)
            c = torch.where(moving, c * (1 - tau / tau_max), c)
            active = moving & (c.sum() > threshold)
        too_many_bad = (~good).sum() > self.f
        best_p = torch.where(too_many_bad, torch.full_like(best_p, math.nan), best_p)
        return weighted_sum(best_p, x, good, cols)
