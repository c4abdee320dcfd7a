"""Byzantine behaviours. Byzantine workers forge on their own rank; the server never forges.

An attack sees the step through an AttackContext: the rows this rank is about to send (the
vectors honest workers would send, worker momentum included), which logical workers are
Byzantine at this step, and the Exchange through which an omniscient attack pays for what it
learns about honest workers. `forge` overwrites the local Byzantine rows in place. It is
called on every rank, because collectives need every rank, also those without attackers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Type

import torch

from byzddp import streams
from byzddp.config import ConfigError


@dataclass
class AttackContext:
    step: int
    seed: int
    rows: torch.Tensor          # (block, d): this rank's vectors, in the order of `workers`
    workers: range              # logical workers hosted here
    byzantine: List[int]        # logical ids of the Byzantine workers at this step
    exchange: object            # byzddp.exchange.Exchange
    n: int
    f_declared: int

    @property
    def local_byzantine(self) -> List[int]:
        """Row positions (into `rows`) of the Byzantine workers hosted here."""
        return [i for i, w in enumerate(self.workers) if w in self.byzantine]

    @property
    def honest_mask(self) -> torch.Tensor:
        """(block,) bool on the rows' device: which local rows are honest (padding is not)."""
        mask = torch.zeros(self.rows.shape[0], dtype=torch.bool)
        for i, w in enumerate(self.workers):
            mask[i] = w not in self.byzantine
        return mask.to(self.rows.device)


class Attack:
    name = "none"
    needs_gradient = True       # Byzantine workers first compute an honest-looking vector

    def __init__(self, cfg):
        self.cfg = cfg

    def labels(self, y: torch.Tensor, classes: int) -> torch.Tensor:
        """Labels a Byzantine worker trains on (honest ones always use the true labels)."""
        return y

    def forge(self, ctx: AttackContext) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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


ATTACKS: Dict[str, Type[Attack]] = {cls.name: cls for cls in (Attack, BitFlip, LabelFlip)}


def real_f(cfg) -> int:
    """How many workers actually attack: attack.count, default the declared f; none: 0."""
    if cfg.attack.name == "none":
        return 0
    return cfg.workers.byzantine if cfg.attack.count is None else cfg.attack.count


def byzantine_set(cfg, step: int) -> List[int]:
    """The Byzantine workers at `step`: the last f by default, or a fresh draw per step."""
    n, f = cfg.workers.n, real_f(cfg)
    if f == 0:
        return []
    if cfg.attack.rotate:
        perm = torch.randperm(n, generator=streams.generator("byzantine-set", cfg.seed, step))
        return sorted(perm[:f].tolist())
    return list(range(n - f, n))


def policy(cfg) -> str:
    return "rotating" if cfg.attack.rotate else "last_f"


def build(cfg) -> Attack:
    return ATTACKS[cfg.attack.name](cfg)


def validate(cfg) -> None:
    a, n = cfg.attack, cfg.workers.n
    if a.name not in ATTACKS:
        raise ConfigError(f"config key attack.name: unknown attack '{a.name}'; choose one of "
                          f"{', '.join(sorted(ATTACKS))}")
    if a.count is not None and not 0 <= a.count < n:
        raise ConfigError(f"config key attack.count: {a.count} attackers out of workers.n={n}; "
                          f"it must be between 0 and n-1")
