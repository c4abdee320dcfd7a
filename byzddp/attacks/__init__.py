"""Byzantine behaviours. Byzantine workers forge on their own rank; the server never forges.

An attack sees the step through an AttackContext: the rows this rank is about to send (the
vectors honest workers would send, worker momentum included), which logical workers are
Byzantine at this step, and the Exchange through which an omniscient attack pays for what it
learns about honest workers. `forge` overwrites the local Byzantine rows in place. It is
called on every rank, because collectives need every rank, also those without attackers.

Who attacks: the last f logical workers, f = attack.count (default: the declared f,
workers.byzantine, which is what the rule is told), or with attack.rotate a fresh set every
step keyed by (seed, step).

What each attack pays for on the wire (d = model size; nothing at all when no worker attacks):
    none bitflip labelflip gaussian nan inf zero stale   no collective
    ipm, nm             one exact sum of d values over honest workers
    alie                two exact sums (the mean, then the squared deviations)
    mimic               warm-up steps: two exact sums and n scores; every step: one broadcast
                        of the target's vector from the rank hosting it
    mimic2              one broadcast of group one's vector
    minmax, minsum      one all_gather of every worker's vector (the whole honest set)
    fang                median target: one exact sum (the sign of the honest mean) and two MAX
                        all_reduces of d values (the honest max and min); krum target: one
                        all_gather, then the rule once per halving of lambda (Fang et al. 2020)
    optimal_alie, optimal_ipm   one all_gather, then the pipeline attack.search_evals times
    adaptive            one all_gather, then the pipeline 4 * attack.grid + 5 times
    rop                 one exact sum (the honest mean); the previous update is already on
                        every rank (Ozfatura et al. 2024)
    backdoor            no collective: Byzantine workers train on their own shards with a
                        trigger stamped on a share of each batch (byzddp/attacks/backdoor.py)

Exact sums: `exact_sum` adds honest vectors in fixed point (integers held exactly in float64),
so the sum is bit-identical for any number of ranks (see docs/design.md, "Exact sums of honest
vectors").

Building: `build(name, **params)` makes an attack from its own parameters (each class lists
them in `params`, keyword arguments with defaults, checked by its `check_values`);
`from_config(cfg)` reads cfg.attack.<p> for those; `validate(cfg)` also checks the (n, f) the
attack needs (`check`). n, f, seed and step reach an attack at forge time, in the AttackContext.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Type

import torch

from byzddp import plugins, streams
from byzddp.attacks.adaptive import Adaptive
from byzddp.attacks.backdoor import Backdoor
from byzddp.attacks.fang import Fang
from byzddp.attacks.base import Attack, AttackContext, copy_of, exact_sum, honest_mean, honest_std, require_positive
from byzddp.attacks.omniscient import (ALIE, IPM, MinMax, MinSum, Mimic, Mimic2, NormalizedMean, alie_z,
                                       search_gamma)
from byzddp.attacks.optimal import OptimalALIE, OptimalIPM, line_search
from byzddp.attacks.rop import ROP
from byzddp.attacks.simple import BitFlip, Gaussian, Inf, LabelFlip, NaN, Stale, Zero
from byzddp.errors import ConfigError

__all__ = ["ATTACKS", "Attack", "AttackContext", "alie_z", "attack_class", "build", "byzantine_set", "copy_of", "exact_sum",
           "from_config", "honest_mean", "honest_std", "line_search", "policy", "real_f", "search_gamma",
           "validate"]

ATTACKS: Dict[str, Type[Attack]] = dict(sorted({cls.name: cls for cls in (
    Attack, BitFlip, LabelFlip, Gaussian, NormalizedMean, Mimic, Mimic2, ALIE, IPM, MinMax, MinSum,
    NaN, Inf, Zero, Stale, Fang, OptimalALIE, OptimalIPM, ROP, Backdoor, Adaptive)}.items()))


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


def whole_set_samplers(cfg) -> Optional[List[int]]:
    """The fixed Byzantine set, which samples the whole training set instead of holding a shard
    (the paper), or None when every worker holds a shard: the set rotates, or the attack trains
    on data of its own (backdoor)."""
    if cfg.attack.rotate or attack_class(cfg.attack.name).holds_data:
        return None
    return byzantine_set(cfg, 0)


def policy(cfg) -> str:
    return "rotating" if cfg.attack.rotate else "last_f"


plugins.register("attack.name", "attack", "Attack", ATTACKS,
                 "a subclass of byzddp.attacks.Attack", lambda obj: isinstance(obj, type) and issubclass(obj, Attack),
                 "set attack.<param> instead")


def build(name: str, **params) -> Attack:
    """The attack `name` with its own parameters (those in its class's `params`; left out:
    the defaults). n, f, seed and step come at forge time, in the AttackContext."""
    cls = plugins.resolve("attack.name", name)
    for key in params:
        if key not in cls.params:
            raise ConfigError(f"attack {name} takes no parameter '{key}'; its parameters: "
                              f"{', '.join(cls.params) or 'none'}")
    cls.check_values(**params)
    return cls(**params)


def config_params(cfg, cls: Type[Attack]) -> dict:
    """cls's parameters as the config sets them (cfg.attack.<p>; a plug-in's: attack.args)."""
    if plugins.is_path(cfg.attack.name):
        return dict(cfg.attack.args)
    return {p: getattr(cfg.attack, p) for p in cls.params}


def attack_class(name: str) -> Type[Attack]:
    """The Attack class registered as `name`, or the plug-in an import path names (a subclass
    of byzddp.attacks.Attack)."""
    return plugins.resolve("attack.name", name)


def from_config(cfg) -> Attack:
    name = cfg.attack.name
    if not plugins.is_path(name):
        return build(name, **config_params(cfg, ATTACKS[name]))
    cls = attack_class(name)
    try:
        return cls(**config_params(cfg, cls))
    except TypeError as e:
        if e.__traceback__ is not None and e.__traceback__.tb_next is not None:   # raised inside __init__
            raise plugins.raised("attack.name", name, e) from None
        raise ConfigError(f"config key attack.args: the attack '{name}' does not take these keywords ({e}); "
                          f"it is called with attack.args") from None
    except ConfigError:
        raise
    except Exception as e:
        raise plugins.raised("attack.name", name, e) from None


def validate(cfg) -> None:
    """One-line ConfigError for an attack that cannot run on the config's workers, or for any
    attack parameter that is never valid."""
    a, n = cfg.attack, cfg.workers.n
    cls = attack_class(a.name)
    plugins.check_args("attack.name", a.name, a.args, cls)
    if plugins.is_path(a.name):
        # A plug-in's positive parameters are attack.args.<p>; checked here, so named so.
        for key in cls.positive:
            if key in a.args:
                require_positive(f"args.{key}", a.args[key])
    if a.count is not None and not 0 <= a.count < n:
        raise ConfigError(f"config key attack.count: {a.count} attackers out of workers.n={n}; "
                          f"it must be between 0 and n-1")
    count_key = "attack.count" if a.count is not None else "workers.byzantine"
    cls.check(n, real_f(cfg), count_key, **config_params(cfg, cls))
    cls.check_rule(cfg.aggregator.name, **config_params(cfg, cls))
    for other in ATTACKS.values():      # the attack.<p> values of every built-in attack
        other.check_values(**{p: getattr(a, p) for p in other.params})
    if cfg.workers.participation < 1 and (cls.fixed_set or cls.needs_pipeline):
        raise ConfigError(f"config key workers.participation: attack {a.name} models all n workers every round "
                          f"({'it copies fixed honest workers' if cls.fixed_set else 'it runs the pipeline on all n rows'}); "
                          f"set workers.participation=1 or choose another attack")
    if cls.fixed_set and a.rotate:
        raise ConfigError(f"config key attack.rotate: {a.name} copies fixed honest workers; "
                          f"use attack.rotate=false with it")
    if cls.partition is not None and cfg.data.partition != cls.partition:
        raise ConfigError(f"config key data.partition: {a.name} needs honest workers in two groups "
                          f"sharing data; set data.partition={cls.partition} (got {cfg.data.partition})")
