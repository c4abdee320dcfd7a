"""Attacks that need nothing from honest workers: faults, sign flips, noise, stale vectors."""
from __future__ import annotations

from typing import Dict, List

import torch

from byzddp import streams
from byzddp.attacks.base import Attack
from byzddp.errors import ConfigError


class BitFlip(Attack):
    """Send -g: a sign-flipping fault of the sender's own gradient."""
    name = "bitflip"

    def forge(self, ctx):
        for i in ctx.local_byzantine:
            ctx.rows[i].neg_()


class LabelFlip(Attack):
    """Train on label C-1-y and send that honest-looking gradient."""
    name = "labelflip"

    def labels(self, y, classes):
        return classes - 1 - y


class Gaussian(Attack):
    """Send N(0, sigma^2 I), drawn from a stream keyed by (seed, worker, step)."""
    name = "gaussian"
    params = positive = ("sigma",)
    needs_gradient = False

    def __init__(self, sigma: float = 200.0):
        self.sigma = sigma

    def forge(self, ctx):
        for i in ctx.local_byzantine:
            g = streams.generator("gaussian", ctx.seed, ctx.workers[i], ctx.step)
            noise = torch.randn(ctx.d, generator=g) * self.sigma
            ctx.rows[i].copy_(noise)


class Fault(Attack):
    """A broken worker: sends a constant vector (NaN, +Inf, or zeros for a crashed one)."""
    needs_gradient = False
    value = 0.0

    def forge(self, ctx):
        for i in ctx.local_byzantine:
            ctx.rows[i].fill_(self.value)


class NaN(Fault):
    name, value = "nan", float("nan")


class Inf(Fault):
    name, value = "inf", float("inf")


class Zero(Fault):
    name, value = "zero", 0.0


class Stale(Attack):
    """Resend its own honest-looking vector of `attack.delay` steps ago (its oldest before then).

    Each Byzantine worker keeps the last delay+1 vectors it computed while Byzantine: with
    the default fixed set that is every step; with a rotating set, its last delay+1 Byzantine
    steps. The buffers live on the hosting ranks; a checkpoint gathers them to rank 0.
    """
    name = "stale"
    params = ("delay",)

    def __init__(self, delay: int = 10):
        self.delay = delay
        self.history: Dict[int, List[torch.Tensor]] = {}
        self.exchange = None
        self.trimmed = False

    def forge(self, ctx):
        self.exchange = ctx.exchange
        if not self.trimmed:    # after a resume every rank holds all buffers: keep its own
            self.history = {w: v for w, v in self.history.items() if w in ctx.workers}
            self.trimmed = True
        keep = self.delay + 1
        for i in ctx.local_byzantine:
            past = self.history.setdefault(ctx.workers[i], [])
            past.append(ctx.rows[i].clone())
            del past[:-keep]
            ctx.rows[i].copy_(past[0])

    @classmethod
    def check_values(cls, delay=10, **_):
        if delay < 1:
            raise ConfigError(f"config key attack.delay: stale needs a delay of at least 1 step, got {delay}")

    def state_dict(self):
        """Collective once the attack has run (every rank hands rank 0 its buffers)."""
        mine = {w: torch.stack(v).cpu() for w, v in self.history.items()}
        if self.exchange is None:
            return {"history": mine}
        parts = self.exchange.gather_object(mine)
        if parts is None:
            return {}
        return {"history": {w: v for part in parts for w, v in part.items()}}

    def load_state_dict(self, state):
        self.history = {int(w): list(v.clone().unbind(0)) for w, v in state.get("history", {}).items()}
        self.trimmed = False
