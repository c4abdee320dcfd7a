"""The robust pipeline of a run, built once from its config: pre-aggregation, then the rule.

`build(cfg)` returns `Pipeline(pre, rule, m, fp)`: the Resampler (`byzddp.resampling`), the rule
(`byzddp.aggregators`) told f' = fp, the m vectors the rule sees after pre-aggregation and the
f' of them that may be Byzantine. With workers.participation q < 1 a round has round(q n)
workers (byzddp/rounds.py), and the worst round holds all f declared Byzantine workers. `validate(cfg)` checks the pre-aggregation and the rule's
requirements on (m, f') first, refusing (or, with aggregator.allow_unsafe, warning) with one
line. The config is duck-typed: this module never imports byzddp.config.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from byzddp import aggregators, attacks, plugins, resampling, rounds
from byzddp.aggregators.base import Aggregator
from byzddp.errors import ConfigError
from byzddp.resampling import Resampler


@dataclass
class Pipeline:
    pre: Resampler      # the pre-aggregation
    rule: Aggregator    # the robust rule
    m: int              # vectors the rule sees
    fp: int             # f': how many of them may be Byzantine


def _given(cfg, cls) -> dict:
    """The config's values of the rule's parameters (None: the default); a plug-in rule's are
    aggregator.args."""
    if plugins.is_path(cfg.aggregator.name):
        return dict(cfg.aggregator.args)
    return {p: getattr(cfg.aggregator, p, None) for p in cls.params}


def build(cfg) -> Pipeline:
    n, f = rounds.workers_per_round(cfg), cfg.workers.byzantine
    pre = resampling.build(cfg.resampling.name, s=cfg.resampling.s, f=f, seed=cfg.seed, tau=cfg.resampling.tau)
    m, fp = pre.num_outputs(n), pre.byzantine_outputs(n, f)
    name = cfg.aggregator.name
    cls = aggregators.rule_class(name)
    params = cls.resolve(_given(cfg, cls), m, fp)
    if plugins.is_path(name):
        return Pipeline(pre, aggregators.build_plug_in(cls, name, params), m, fp)
    return Pipeline(pre, aggregators.build(cls.name, **params), m, fp)


# Pre-aggregations after which row i is still worker i's vector (nnm: worker i's mixture;
# arc, clipping: worker i's vector, scaled).
ROW_KEEPING = ("none", "nnm", "arc", "clipping")


def _check_designated(cfg, designated: int) -> None:
    """A rule that trusts one worker's row (monna) needs row i to be worker i's vector and that
    worker honest at every step."""
    name, n, pre = cfg.aggregator.name, cfg.workers.n, cfg.resampling.name
    if cfg.workers.participation < 1:
        raise ConfigError(f"config key workers.participation: {name} trusts worker {designated} in every round, "
                          f"but workers.participation={cfg.workers.participation:g} leaves it out of some; "
                          f"set workers.participation=1")
    if pre not in ROW_KEEPING:
        raise ConfigError(f"config key resampling.name: {name} trusts worker aggregator.designated={designated}'s "
                          f"row, but {pre} mixes workers into new rows; set resampling.name to one of {', '.join(ROW_KEEPING)}")
    fa = attacks.real_f(cfg)
    if fa == 0 or designated >= n:  # designated >= n: refused by the rule's `impossible`
        return
    if attacks.policy(cfg) == "rotating":
        raise ConfigError(f"config key aggregator.designated: {name} needs worker {designated} honest at every "
                          f"step, but attack.rotate=true draws a fresh Byzantine set each step that can hold it; "
                          f"set attack.rotate=false (then the last {fa} workers attack)")
    if designated in attacks.byzantine_set(cfg, 0):
        raise ConfigError(f"config key aggregator.designated: worker {designated} is Byzantine (attack "
                          f"{cfg.attack.name}: the last {fa} of workers.n={n} attack); choose a worker "
                          f"below {n - fa}")


def validate(cfg) -> Pipeline:
    """One-line ConfigError for a pre-aggregation or rule that cannot run on the config's
    workers, or a rule requirement on (m, f') that fails (a warning under allow_unsafe)."""
    r, a, w = cfg.resampling, cfg.aggregator, cfg.workers
    n = rounds.workers_per_round(cfg)
    sampled = (f" (workers.participation={w.participation:g}: {n} of the n={w.n} workers a round, "
               f"all f={w.byzantine} Byzantine ones in the worst)") if n < w.n else ""
    attackers = max(w.byzantine, attacks.real_f(cfg))     # attack.count may exceed the declared f
    if sampled and attackers >= n:
        raise ConfigError(f"config key workers.participation: a round of {n} workers could be all Byzantine "
                          f"({attackers} of the n={w.n} workers are, workers.participation={w.participation:g}); "
                          f"raise workers.participation or lower workers.byzantine (and attack.count)")
    resampling.check(r.name, r.s, n, w.byzantine, tau=r.tau)
    cls = aggregators.rule_class(a.name)
    plugins.check_args("aggregator.name", a.name, a.args, aggregators.keyword_target(cls))
    if plugins.is_path(a.name) and not cls.sharded and cfg.train.exchange == "sharded":
        raise ConfigError(f"config key train.exchange: the rule '{a.name}' needs whole rows (sharded=False); "
                          f"use train.exchange=gather, or write a rule that computes column slices")
    keys = dict.fromkeys(k for name in aggregators.RULES for k in aggregators.PARAMS[name])
    for key in keys:
        value = getattr(a, key, None)
        problem = None if value is None else aggregators.param_problem(key, value)
        if problem:
            raise ConfigError(f"config key aggregator.{key}: {problem}, got {value!r}")
    p = build(cfg)
    cls = type(p.rule)
    params = cls.resolve(_given(cfg, cls), p.m, p.fp)
    if issubclass(cls, aggregators.FunctionRule):
        cls.probe(p.m, p.rule.keywords)
    if "designated" in cls.params:
        _check_designated(cfg, params["designated"])
    impossible = cls.impossible(p.m, params)     # no flag lifts these
    if impossible:
        raise ConfigError(f"config key {impossible[0]}: {impossible[1]}")
    for holds, condition, numbers, fix in cls.requirements(p.m, p.fp, params):
        if holds:
            continue
        msg = (f"aggregator {a.name} needs {condition}, but {p.pre.seen} the rule sees m={p.m} vectors "
               f"with up to f'={p.fp} Byzantine ({numbers}){sampled}")
        if a.allow_unsafe:
            warnings.warn(f"{msg}; running outside the rule's guarantee (aggregator.allow_unsafe=true)",
                          UserWarning, stacklevel=2)
        else:
            fix = fix or p.pre.generic_fix
            if sampled:
                fix = f"raise workers.participation, {fix}"
            raise ConfigError(f"{msg}; {fix}, or set aggregator.allow_unsafe=true")
    return p
