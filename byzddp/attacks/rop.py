"""Relocated orthogonal perturbation (ROP; Ozfatura, Ozfatura, Kupcu & Gunduz, "Byzantines can also
learn from history: fall of centered clipping in federated learning", IEEE TIFS 2024), written from
the paper's description and the parameters of its authors' FL-Byzantine-Library.

Centered clipping clips every input around a reference, the previous aggregate c. ROP moves the
attack there (relocation: an input at c is never clipped) and perturbs it orthogonally to the
direction the honest inputs agree on, where clipping around c cannot shrink it:
    location  = pi * c + (1 - pi) * mu                     mu = the honest mean
    reference = lamb * c + (1 - lamb) * mu                 (c := mu at the first step)
    p         = the all-ones vector minus its projection on the reference, normalised
    p         = sin(angle) * p + cos(angle) * reference / ||reference||
    send        location + z * p / ||p||
c is the update the server broadcast at the previous step (ctx.previous, zero before the first
step), the same on every rank; mu is an exact sum (base.honest_mean); everything after is
computed on identical tensors, so the vector is the same for any number of ranks.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from byzddp.attacks.base import Attack, honest_mean
from byzddp.attacks.omniscient import alie_z
from byzddp.errors import ConfigError


def unit(v: torch.Tensor) -> torch.Tensor:
    """v / ||v||, or zeros for v = 0."""
    norm = torch.linalg.vector_norm(v)
    return v / norm if float(norm) > 0 else torch.zeros_like(v)


class ROP(Attack):
    """pi (1: all the way to the reference), lamb (0.9), angle in degrees (90: orthogonal), z the
    perturbation's norm (default as the authors' code: ALIE's z from n and the real f)."""
    name = "rop"
    params = ("z", "pi", "lamb", "angle")
    needs_gradient = False
    needs_previous = True
    min_honest = 1

    def __init__(self, z: Optional[float] = None, pi: float = 1.0, lamb: float = 0.9, angle: float = 90.0):
        self.z, self.pi, self.lamb, self.angle = z, pi, lamb, angle

    @classmethod
    def check_values(cls, z=None, pi=1.0, lamb=0.9, angle=90.0, **_):
        if z is not None and not math.isfinite(z):
            raise ConfigError(f"config key attack.z: must be a finite number, got {z}")
        for key, value in (("pi", pi), ("lamb", lamb)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"config key attack.{key}: rop mixes the reference and the honest mean "
                                  f"with a weight in [0, 1], got {value}")
        if not math.isfinite(angle):
            raise ConfigError(f"config key attack.angle: must be a finite number of degrees, got {angle}")

    @classmethod
    def check(cls, n, f, f_key="attack.count", z=None, **params):
        super().check(n, f, f_key, z=z, **params)
        if z is None and f > 0:
            try:
                alie_z(n, f)
            except ConfigError:
                raise ConfigError(f"config key attack.z: rop cannot derive its perturbation's norm from n={n} "
                                  f"and f={f} (ALIE's formula); give attack.z explicitly") from None

    def forge(self, ctx):
        if not ctx.byzantine:
            return
        mu = honest_mean(ctx)
        c = torch.zeros_like(mu) if ctx.previous is None else ctx.previous.to(torch.float64)
        location = self.pi * c + (1 - self.pi) * mu
        anchor = mu if ctx.previous is None else c
        reference = self.lamb * anchor + (1 - self.lamb) * mu
        ones = torch.ones_like(mu)
        rr = float(reference @ reference)
        orthogonal = unit(ones - reference * (float(ones @ reference) / rr) if rr > 0 else ones)
        a = math.radians(self.angle)
        p = unit(math.sin(a) * orthogonal + math.cos(a) * unit(reference))
        z = self.z if self.z is not None else alie_z(ctx.n, len(ctx.byzantine))
        ctx.send(location + z * p)
