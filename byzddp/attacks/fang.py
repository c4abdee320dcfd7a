"""Fang et al. (USENIX Security 2020), "Local model poisoning attacks to Byzantine-robust federated
learning": the full-knowledge attacks on median-type rules (trimmed mean, median) and on Krum-type
rules (Krum, Multi-Krum, Bulyan), in gradient space."""
from __future__ import annotations

import math

import torch

from byzddp import streams
from byzddp.attacks.base import Attack, everyone, exact_sum, pipeline_on
from byzddp.errors import ConfigError

KRUM_TYPE = ("krum", "multikrum", "bulyan")     # rules that select rows by Krum scores
TARGETS = ("auto", "median", "krum")
LAMBDA_FLOOR = 1e-5     # the paper's threshold: stop halving lambda below it


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


def krum_lambda_bound(g: torch.Tensor, c: int) -> float:
    """The paper's upper bound on lambda for m = h + c workers, c of them crafted, in gradient
    space (the global model before the attack, w_Re, is the origin):
        1/((m - 2c - 1) sqrt(d)) * min_i sum_{l in the m-c-2 honest nearest to i} ||g_l - g_i||
        + 1/sqrt(d) * max_i ||g_i||,
    i and l over the h honest rows g (float64). m - 2c - 1 and m - c - 2 are clamped to >= 1
    outside the theory, the neighbour count to at most h - 1."""
    h, d = g.shape
    m = h + c
    norms2 = (g * g).sum(1)
    dist = (norms2[:, None] + norms2[None, :] - 2 * (g @ g.T)).clamp(min=0).sqrt()
    dist.fill_diagonal_(math.inf)
    k = min(max(m - c - 2, 1), h - 1)
    near = torch.topk(dist, k, dim=1, largest=False).values.sum(1) if k >= 1 else torch.zeros(h, dtype=g.dtype)
    root = math.sqrt(d)
    return float(near.min()) / (max(m - 2 * c - 1, 1) * root) + float(norms2.max().sqrt()) / root


class Fang(Attack):
    """Fang et al.'s full-knowledge attacks, by the type of rule attacked (attack.target; auto:
    krum for krum, multikrum and bulyan, median for every other rule).

    median: s = sign of the honest mean; per coordinate each Byzantine worker sends a value
    beyond the honest extreme opposite to s: where s > 0 the honest min m scaled by b (m < 0) or
    1/b (m >= 0), where s <= 0 the honest max M scaled by b (M > 0) or 1/b (M <= 0); b uniform in
    [1, 2] from a stream keyed by (seed, step, worker).

    krum: every Byzantine worker sends -lambda * s (the crafted local model w_Re - lambda*s of the
    paper, as a gradient: against the descent direction), lambda starting at the paper's upper
    bound (`krum_lambda_bound`) and halved until the run's rule, told the declared f, selects a
    crafted vector (a selected output holds a Byzantine worker), or lambda falls below 1e-5.
    The rule is run on the attacker's copy of the pipeline (base.pipeline_on: its own random
    draw for the pre-aggregation). The c-1 other crafted vectors equal the first (the paper
    allows them close to it)."""
    name = "fang"
    params = ("target",)
    needs_gradient = False
    needs_pipeline = True       # auto reads the rule's type; krum runs the rule
    min_honest = 1

    def __init__(self, target: str = "auto"):
        self.target = target
        self.lam = None         # the last lambda of the krum target (for inspection)

    @classmethod
    def check_values(cls, target="auto", **_):
        if target not in TARGETS:
            raise ConfigError(f"config key attack.target: '{target}' is not one of {', '.join(TARGETS)}")

    @classmethod
    def check_rule(cls, rule, target="auto", **_):
        if target == "krum" and rule not in KRUM_TYPE:
            raise ConfigError(f"config key attack.target: fang's krum target halves lambda until the rule "
                              f"selects a crafted vector, so it needs aggregator.name in "
                              f"{', '.join(KRUM_TYPE)} (got {rule}); set attack.target=auto or median")

    def kind(self, ctx) -> str:
        """The target in effect: attack.target, or for auto the configured rule's type (median
        when no pipeline is given)."""
        if self.target != "auto":
            return self.target
        rule = getattr(ctx.pipeline, "rule", None)
        return "krum" if rule is not None and rule.name in KRUM_TYPE else "median"

    def forge(self, ctx):
        if not ctx.byzantine:
            return
        if self.kind(ctx) == "krum":
            return self.forge_krum(ctx)
        s = torch.sign(exact_sum(ctx.local_honest, ctx.exchange, ctx.n, ctx.d, ctx.rows.device))
        top, low = honest_extremes(ctx)
        edge = torch.where(s > 0, low, top)     # the honest extreme opposite to s
        outward = torch.where(s > 0, edge < 0, edge > 0)
        for i in ctx.local_byzantine:
            g = streams.generator("fang", ctx.seed, ctx.step, ctx.workers[i])
            b = (1 + torch.rand(ctx.d, generator=g, dtype=torch.float64)).to(ctx.rows.device)
            ctx.rows[i].copy_(torch.where(outward, edge * b, edge / b))

    def forge_krum(self, ctx):
        rows = everyone(ctx)
        if not ctx.local_byzantine:
            return
        device = rows.device
        g = rows.index_select(0, torch.tensor(ctx.honest, device=device)).to(torch.float64)
        s = torch.sign(g.sum(0))
        byzantine = torch.tensor(ctx.byzantine, device=device)
        is_byzantine = torch.zeros(ctx.n, dtype=torch.bool)
        is_byzantine[ctx.byzantine] = True
        lam = krum_lambda_bound(g, len(ctx.byzantine))
        while lam >= LAMBDA_FLOOR:
            sent = rows.clone()
            sent[byzantine] = (-lam * s).to(rows.dtype)
            _, groups = pipeline_on(ctx, sent)
            chosen = ctx.pipeline.rule.selected.tolist()
            if any(bool(is_byzantine[groups[i].cpu()].any()) for i in chosen):
                break
            lam /= 2
        self.lam = lam
        ctx.send(-lam * s)
