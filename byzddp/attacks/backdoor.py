"""The backdoor (targeted) attack: Byzantine workers train on their own shards with a share
of each batch carrying a pixel-pattern trigger and relabelled to the target class
(Bagdasaryan et al. 2020, "How to backdoor federated learning"; Sun et al. 2019, "Can you
really backdoor federated learning?"), and send the resulting vector scaled by `boost`
(boost > 1: model replacement, which outweighs the honest workers in a mean). Its damage is
the attack success rate (byzddp/trigger.py), not the test accuracy."""
from __future__ import annotations

from byzddp.attacks.base import Attack
from byzddp.errors import ConfigError
from byzddp.trigger import Trigger


class Backdoor(Attack):
    name = "backdoor"
    params = ("target_class", "poison_fraction", "trigger_size", "boost")
    positive = ("trigger_size", "boost")
    holds_data = True

    def __init__(self, target_class: int = 0, poison_fraction: float = 0.5, trigger_size: int = 4,
                 boost: float = 1.0):
        self.target_class, self.poison_fraction = target_class, poison_fraction
        self.trigger_size, self.boost = trigger_size, boost
        self.trigger = None

    @classmethod
    def check_values(cls, **params) -> None:
        super().check_values(**params)
        if "poison_fraction" in params and not 0 < params["poison_fraction"] <= 1:
            raise ConfigError(f"config key attack.poison_fraction: the share of each batch poisoned must be "
                              f"in (0, 1], got {params['poison_fraction']}")
        if "target_class" in params and params["target_class"] < 0:
            raise ConfigError(f"config key attack.target_class: a class index is >= 0, got {params['target_class']}")

    def prepare(self, train_x, classes: int) -> None:
        self.trigger = Trigger.for_data(train_x, classes, self.trigger_size, self.target_class)

    def poison(self, x, y, classes: int):
        return self.trigger.poison(x, y, self.poison_fraction)

    def forge(self, ctx) -> None:
        if self.boost != 1:
            for i in ctx.local_byzantine:
                ctx.rows[i].mul_(self.boost)
