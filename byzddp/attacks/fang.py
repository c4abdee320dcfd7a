"""Fang et al. (USENIX Security 2020), "Local model poisoning attacks to Byzantine-robust federated
learning": the full-knowledge attack on trimmed-mean/median-type rules, in gradient space."""
from __future__ import annotations

import torch

from byzddp import streams
from byzddp.attacks.base import Attack, exact_sum
from byzddp.errors import ConfigError


def honest_extremes(ctx):
    """(max, min) per coordinate of the honest vectors, on every rank (MAX all_reduces: exact)."""
    top = torch.full((ctx.d,), -torch.inf, dtype=ctx.rows.dtype, device=ctx.rows.device)
    low = top.clone()
    for g in ctx.local_honest:
        torch.maximum(top, g, out=top)
        torch.maximum(low, -g, out=low)
    ctx.exchange.all_reduce_max(top)
    ctx.exchange.all_reduce_max(low)
    return top, -low


class Fang(Attack):
    """s = sign of the honest mean; per coordinate each Byzantine worker sends a value beyond the
    honest extreme opposite to s: where s > 0 the honest min m scaled by b (m < 0) or 1/b (m >= 0),
    where s <= 0 the honest max M scaled by b (M > 0) or 1/b (M <= 0); b uniform in [1, 2] from a
    stream keyed by (seed, step, worker). target: median (the krum target is not implemented)."""
    name = "fang"
    params = ("target",)
    needs_gradient = False
    min_honest = 1

    def __init__(self, target: str = "median"):
        self.target = target

    @classmethod
    def check_values(cls, target="median", **_):
        if target != "median":
            raise ConfigError(f"config key attack.target: fang implements only target=median here, "
                              f"got '{target}'; set attack.target=median")

    def forge(self, ctx):
        if not ctx.byzantine:
            return
        s = torch.sign(exact_sum(ctx.local_honest, ctx.exchange, ctx.n, ctx.d, ctx.rows.device))
        top, low = honest_extremes(ctx)
        edge = torch.where(s > 0, low, top)     # the honest extreme opposite to s
        outward = torch.where(s > 0, edge < 0, edge > 0)
        for i in ctx.local_byzantine:
            g = streams.generator("fang", ctx.seed, ctx.step, ctx.workers[i])
            b = (1 + torch.rand(ctx.d, generator=g, dtype=torch.float64)).to(ctx.rows.device)
            ctx.rows[i].copy_(torch.where(outward, edge * b, edge / b))
