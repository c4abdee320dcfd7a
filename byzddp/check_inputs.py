"""What the rule check kit (byzddp/check.py) feeds a rule and measures: the rule under test
(`Subject`, built from a name, a class or a function, called safely), synthetic heterogeneous
honest rows (iid or non-iid), the rows of each attack family, and kappa, the distance and the
bound it compares the output with."""
from __future__ import annotations

import inspect
import math
from typing import Callable, Tuple, Union

import torch

from byzddp import aggregators, diagnostics
from byzddp.aggregators import Aggregator, FunctionRule
from byzddp.attacks.adaptive import mimic_targets
from byzddp.attacks.omniscient import IPM, alie_z
from byzddp.attacks.optimal import OptimalALIE, OptimalIPM
from byzddp.attacks.simple import Gaussian
from byzddp.errors import ConfigError

BOUND = 1e3             # "bounded": within BOUND x the largest honest norm of the honest mean
CORRUPT = 1e30          # the corrupted rows' magnitude (and the far rows' distance, x the scale)
FAMILIES = ("alie", "ipm", "signflip", "mimic", "gaussian", "large_norm")


# ---------------------------------------------------------------------------- the rule

class Subject:
    """The rule under test: builds an instance for (m, f) and calls it with the inputs it takes
    (a generator for rules that draw, a root gradient near the honest mean for fltrust)."""

    def __init__(self, rule: Union[str, type, Callable], params: dict):
        if isinstance(rule, str):
            self.name = rule
            self.cls = aggregators.rule_class(rule)
        elif isinstance(rule, type) and issubclass(rule, Aggregator):
            self.name, self.cls = rule.name or rule.__name__, rule
        elif callable(rule):
            self.name = getattr(rule, "__name__", "rule")
            self.cls = type(f"FunctionRule[{self.name}]", (FunctionRule,),
                            {"name": self.name, "function": staticmethod(rule)})
        else:
            raise ConfigError(f"rule: expected a name, an Aggregator subclass or a function, got {type(rule).__name__}")
        self.params = params
        source = self.cls.function if issubclass(self.cls, FunctionRule) else self.cls
        self.exempt = dict(getattr(source, "exempt", {}) or {})

    def params_for(self, m: int, f: int) -> dict:
        """The constructor's keywords for (m, f), as a config gives them: the rule's defaults
        (its constructor's) for the parameters not given, then its own `resolve`."""
        given = {}
        for name, p in inspect.signature(self.cls.__init__).parameters.items():
            if name in self.cls.params and p.default is not inspect.Parameter.empty:
                given[name] = p.default
        return self.cls.resolve({**given, **self.params}, m, f)

    def declared(self, m: int, f: int) -> Tuple[bool, str]:
        """Whether the rule's own declarations admit (m, f): not impossible, every requirement
        holds; and the first reason when not."""
        params = self.params_for(m, f)
        impossible = self.cls.impossible(m, params)
        if impossible:
            return False, impossible[1]
        for holds, condition, numbers, _ in self.cls.requirements(m, f, params):
            if not holds:
                return False, f"{condition} ({numbers})"
        return True, ""

    def build(self, m: int, f: int) -> Aggregator:
        params = self.params_for(m, f)
        if self.cls.name in aggregators.RULES and aggregators.rule_class(self.cls.name) is self.cls:
            return aggregators.build(self.cls.name, **params)
        return aggregators.build_plug_in(self.cls, self.name, params)

    def __call__(self, x: torch.Tensor, f: int, honest: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """One call of a fresh instance (so a stateful rule starts from its initial state) on the
        rows x, of which the rows `honest` (a bool mask) are honest."""
        rule = self.build(x.shape[0], f)
        inputs = {}
        if rule.draws:
            inputs["generator"] = torch.Generator(device=x.device).manual_seed(seed)
        if rule.trusted_root:
            inputs["root_gradient"] = root_near(x[honest], seed)
        return rule(x, **inputs)


def root_near(honest: torch.Tensor, seed: int) -> torch.Tensor:
    """A root gradient near the honest mean (fltrust's server gradient on clean data): the mean
    plus noise of a tenth of the honest spread."""
    g = honest.to(torch.float64)
    mean = g.mean(0)
    spread = (g - mean).square().sum(1).mean().sqrt() / math.sqrt(g.shape[1])
    noise = torch.randn(g.shape[1], generator=torch.Generator().manual_seed(10_000 + seed), dtype=torch.float64)
    return (mean + 0.1 * spread * noise.to(g.device)).to(honest.dtype)


# ---------------------------------------------------------------------------- the inputs

def honest_rows(h: int, d: int, kind: str, seed: int) -> torch.Tensor:
    """h honest vectors (float64): iid, a common mean plus unit noise; non-iid, a worker-specific
    drift of twice the noise's size on top (as workers on sorted shards)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    noise = torch.randn(h, d, generator=g, dtype=torch.float64)
    if kind == "iid":
        return mean + noise
    drift = 2.0 * torch.randn(h, d, generator=g, dtype=torch.float64)
    return mean + drift + 0.5 * noise


def attack_rows(family: str, g: torch.Tensor, f: int, seed: int) -> torch.Tensor:
    """The f Byzantine rows of `family` against the honest rows g (float64), with the families'
    own formulas (byzddp.attacks)."""
    h, d = g.shape
    mean = g.mean(0)
    gen = torch.Generator().manual_seed(20_000 + seed)
    if family == "alie":
        base, direction = OptimalALIE().line(g, mean)
        try:
            z = alie_z(h + f, f)
        except ConfigError:     # (n, f) for which ALIE defines no z
            z = 0.0
        z = z if z > 0 else 1.0     # n = 10, f = 2 gives z = 0: no attack at all
        return (base + z * direction).expand(f, -1)
    if family == "ipm":
        base, direction = OptimalIPM().line(g, mean)
        return (base + IPM().epsilon * direction).expand(f, -1)
    if family == "signflip":    # the Byzantine workers' own honest-looking vectors, negated
        own = mean + (g - mean)[torch.randint(h, (f,), generator=gen)]
        return -own
    if family == "mimic":
        return g[mimic_targets(g, 1)[0]].expand(f, -1)
    if family == "gaussian":
        return Gaussian().sigma * torch.randn(f, d, generator=gen, dtype=torch.float64)
    if family == "large_norm":  # colluding rows far from everything, in one random direction
        u = torch.randn(d, generator=gen, dtype=torch.float64)
        return (mean + 1e6 * g.norm(dim=1).max() * u / u.norm()).expand(f, -1)
    raise ValueError(family)


def with_attack(g: torch.Tensor, byz: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """All rows (honest first, the Byzantine last, as the last f workers attack) and the honest mask."""
    x = torch.cat([g, byz.to(g.dtype)])
    mask = torch.zeros(x.shape[0], dtype=torch.bool)
    mask[:g.shape[0]] = True
    return x, mask


def kappa(out: torch.Tensor, g: torch.Tensor) -> float:
    """||F(x) - mean_H||^2 / ((1/|H|) sum_H ||x_i - mean_H||^2)  (Allouah et al. 2023), the honest
    rows g all of H: the server's own diagnostic (byzddp/diagnostics.py), inf or nan where it is."""
    totals = diagnostics.sums(g, out, list(range(len(g))))
    return float(totals[0] / (totals[1] / len(g)))


def error_bound(g: torch.Tensor) -> float:
    return BOUND * float(g.to(torch.float64).norm(dim=1).max())


def distance(out: torch.Tensor, g: torch.Tensor) -> float:
    value = float((out.to(torch.float64) - g.to(torch.float64).mean(0)).norm())
    return math.inf if math.isnan(value) else value
