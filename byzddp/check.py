"""Vet a robust rule on synthetic heterogeneous inputs: `python -m byzddp.check RULE [options]`.

RULE is a built-in name (krum, cm, ...) or a plug-in `package.module:attr` (a function (m, d) ->
(d,) or an Aggregator subclass); `key=value` words after it are the rule's keywords. The table
has one row per property (docs/check.md says what each one tests and how to read it), then the
empirical kappa per attack family. Exit status 0 when every property holds, 1 when one fails
(each failing one named on the last line), 2 for a bad argument (one line). A rule that raises
or returns garbage fails the property it broke; it never ends the check with a traceback.

A rule that legitimately lacks a property says so in its class attribute `exempt`, a dict from
the property's key (PROPERTIES) to the reason, and the table prints the reason in place of a
verdict; a function rule says so in an `exempt` attribute of the function.

In Python: `byzddp.check.run(rule, ...)` returns the Report; `byzddp.testing.check_rule(...)`
asserts that it passes (for a researcher's own tests).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import yaml

from byzddp.check_inputs import (BOUND, CORRUPT, FAMILIES, Subject, attack_rows, distance, error_bound,
                                 honest_rows, kappa, with_attack)
from byzddp.errors import ConfigError

# key: the row's title. `exempt` keys are these.
PROPERTIES = {
    "shape": "shape, dtype, device",
    "input": "input not modified",
    "permutation": "permutation invariance",
    "determinism": "deterministic given its generator",
    "identical": "identical rows give that row",
    "translation": "translation equivariance",
    "bounded": "bounded under f corrupted rows",
    "breakdown": "requirement vs breakdown",
    "kappa": "empirical kappa bounded",
}
TOLERANCE = 1e-5        # relative to the inputs' scale: rounding passes, a real difference does not
KAPPA_LIMIT = 1e6       # a kappa above this means the output followed the attackers


@dataclass
class Row:
    key: str
    status: str         # pass | FAIL | exempt
    detail: str


@dataclass
class Report:
    rule: str
    n: int
    f: int
    d: int
    trials: int
    rows: List[Row] = field(default_factory=list)
    kappa: Dict[Tuple[str, str], float] = field(default_factory=dict)   # (family, inputs) -> max

    @property
    def failed(self) -> List[str]:
        return [r.key for r in self.rows if r.status == "FAIL"]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def worst_kappa(self) -> Tuple[float, str]:
        if not self.kappa:
            return math.nan, "-"
        (family, inputs), value = max(self.kappa.items(), key=lambda kv: _order(kv[1]))
        return value, f"{family}, {inputs}"

    def table(self) -> str:
        width = max(len(t) for t in PROPERTIES.values())
        lines = [f"byzddp.check {self.rule}: n={self.n} rows, f={self.f} Byzantine, d={self.d}, "
                 f"{self.trials} trials", f"{'property':{width}}  result  detail"]
        for r in self.rows:
            lines.append(f"{PROPERTIES[r.key]:{width}}  {r.status:6}  {r.detail}")
        if self.kappa:
            lines += ["", f"{'kappa (max over trials)':{width}}  {'iid':>10}  {'non-iid':>10}"]
            for family in FAMILIES:
                lines.append(f"{family:{width}}  {_num(self.kappa[(family, 'iid')]):>10}  "
                             f"{_num(self.kappa[(family, 'non-iid')]):>10}")
            value, where = self.worst_kappa
            lines.append(f"{'worst':{width}}  {_num(value):>10}  ({where})")
        lines.append("")
        lines.append("all properties hold" if self.ok else
                     "FAILED: " + ", ".join(PROPERTIES[k] for k in self.failed))
        return "\n".join(lines)


def _order(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _num(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


# ---------------------------------------------------------------------------- the properties

class Checker:
    def __init__(self, subject: Subject, n: int, f: int, d: int, trials: int, seed: int, device: str):
        self.s, self.n, self.f, self.d, self.trials, self.seed = subject, n, f, d, trials, seed
        self.device = torch.device(device)
        self.raised: Optional[str] = None      # the first error a sweep (breakdown, kappa) swallowed

    def inputs(self, trial: int, kind: str = "non-iid", family: str = "alie", dtype=torch.float64):
        g = honest_rows(self.n - self.f, self.d, kind, self.seed * 1000 + trial)
        x, mask = with_attack(g, attack_rows(family, g, self.f, self.seed * 1000 + trial) if self.f else g[:0])
        return x.to(self.device, dtype), mask.to(self.device), g.to(self.device, dtype)

    def call(self, x, mask, seed=0, f=None):
        return self.s(x, self.f if f is None else f, mask, seed)

    def scale(self, x: torch.Tensor) -> float:
        return 1.0 + float(x.to(torch.float64).abs().max())

    # each returns (passed, detail)

    def shape(self):
        gpu = torch.cuda.is_available() and self.device.type == "cpu"     # then the GPU too
        devices = [self.device] + ([torch.device("cuda")] if gpu else [])
        seen = []
        for device in devices:
            for dtype in (torch.float32, torch.float64):
                x, mask, _ = self.inputs(0, dtype=dtype)
                x, mask = x.to(device), mask.to(device)
                out = self.call(x, mask)
                if not isinstance(out, torch.Tensor):
                    return False, f"returned a {type(out).__name__}, not a tensor"
                if out.shape != (self.d,) or out.dtype != dtype or out.device != x.device:
                    return False, (f"rows ({self.n}, {self.d}) {dtype} on {x.device} gave {tuple(out.shape)} "
                                   f"{out.dtype} on {out.device}")
                seen.append(f"{str(dtype).replace('torch.', '')} on {device}")
        return True, f"({self.d},), " + ", ".join(seen)

    def input(self):
        for kind in ("iid", "non-iid"):
            x, mask, _ = self.inputs(0, kind)
            before = x.clone()
            self.call(x, mask)
            if not torch.equal(x, before):
                rows = sorted(set(torch.nonzero(x != before)[:, 0].tolist()))
                return False, f"the call wrote into its input (rows {rows[:5]})"
        return True, "the rows are bit-identical after the call"

    def permutation(self):
        worst = 0.0
        for trial in range(self.trials):
            x, mask, _ = self.inputs(trial)
            out = self.call(x, mask, trial)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(trial)).to(self.device)
            again = self.call(x[perm], mask[perm], trial)
            worst = max(worst, float((again - out).abs().max()) / self.scale(x))
        if not worst <= TOLERANCE:
            return False, f"shuffling the rows moved the output by {worst:.2e} of the inputs' scale"
        return True, f"max |F(Px) - F(x)| = {worst:.1e} of the inputs' scale, {self.trials} shuffles"

    def determinism(self):
        for trial in range(self.trials):
            x, mask, _ = self.inputs(trial)
            a, b = self.call(x, mask, trial), self.call(x, mask, trial)
            if not torch.equal(a.view(-1).to(torch.float64), b.view(-1).to(torch.float64)):
                return False, "two calls on the same rows with the same generator seed differ"
        return True, "same rows and generator seed: the same bits" + (
            " (it draws from its generator)" if self.s.cls.draws else "")

    def identical(self):
        worst = 0.0
        for trial in range(self.trials):
            g = 10.0 * torch.randn(self.d, generator=torch.Generator().manual_seed(trial), dtype=torch.float64)
            x = g.expand(self.n, -1).clone().to(self.device)
            mask = torch.ones(self.n, dtype=torch.bool, device=self.device)
            out = self.call(x, mask, trial)
            worst = max(worst, float((out.cpu() - g).abs().max()) / self.scale(x))
        if not worst <= TOLERANCE:
            return False, f"n copies of one row g gave an output {worst:.2e} (of the scale) away from g"
        return True, f"n copies of g give g (to {worst:.1e} of the scale)"

    def translation(self):
        worst = 0.0
        for trial in range(self.trials):
            x, mask, _ = self.inputs(trial)
            gen = torch.Generator().manual_seed(30_000 + trial)
            v = 5 * self.scale(x) * torch.randn(self.d, generator=gen, dtype=torch.float64).to(self.device)
            out, moved = self.call(x, mask, trial), self.call(x + v, mask, trial)
            worst = max(worst, float((moved - v - out).abs().max()) / self.scale(x + v))
        if not worst <= TOLERANCE:
            return False, f"F(x + v) - v differs from F(x) by {worst:.2e} of the scale"
        return True, f"F(x + v) = F(x) + v to {worst:.1e} of the scale"

    def bounded(self):
        if self.f == 0:
            return True, "f = 0: nothing to corrupt"
        kinds = {"+1e30": CORRUPT, "-1e30": -CORRUPT, "+-1e30": None, "+Inf": math.inf, "-Inf": -math.inf,
                 "NaN": math.nan}
        for trial in range(self.trials):
            for name, value in kinds.items():
                x, mask, g = self.inputs(trial, dtype=torch.float32)
                if value is None:
                    signs = torch.randint(2, (self.f, self.d), generator=torch.Generator().manual_seed(trial)) * 2 - 1
                    x[~mask] = (CORRUPT * signs).to(x)
                else:
                    x[~mask] = value
                try:
                    out = self.call(x, mask, trial)
                except Exception as e:
                    return False, f"{self.f} rows of {name}: {_first_line(e)}"
                err = distance(out, g)
                if not err <= error_bound(g):
                    return False, (f"{self.f} rows of {name}: the output is {err:.3g} from the honest mean "
                                   f"(bound {error_bound(g):.3g})")
        return True, f"{self.f} rows of +-1e30, +-Inf or NaN (float32): output within {BOUND:g} x the honest norms"

    def breakdown(self):
        """Sweep f' = 0..n-1 at m = n: where the rule's declarations admit f', it must stay
        bounded against far colluding rows; where it first breaks is reported."""
        admitted, bounded, cannot = [], [], []
        for fp in range(self.n):
            ok, _ = self.s.declared(self.n, fp)
            params = self.s.params_for(self.n, fp)
            if self.s.cls.impossible(self.n, params):
                cannot.append(fp)
                continue
            if ok:
                admitted.append(fp)
            if self._holds_at(fp):
                bounded.append(fp)
        broken = [fp for fp in range(self.n) if fp not in bounded and fp not in cannot]
        first = min(broken) if broken else None
        wrong = [fp for fp in admitted if fp not in bounded]
        declared = f"declared f' <= {max(admitted)}" if admitted else "declared for no f'"
        if admitted and admitted != list(range(max(admitted) + 1)):
            declared = f"declared f' in {admitted}"
        found = f"breaks from f'={first}" if first is not None else f"bounded for every f' < {self.n}"
        if wrong:
            raised = f"; it raised {self.raised}" if self.raised else ""
            return False, f"{declared} at m={self.n}, but breaks at f'={wrong} (far colluding rows){raised}"
        gap = "" if first is None or not admitted or first == max(admitted) + 1 else \
            f" (the declaration is conservative by {first - max(admitted) - 1})"
        return True, f"m={self.n}: {declared}; {found}{gap}"

    def _holds_at(self, fp: int) -> bool:
        """Bounded at f' = fp against three far attacks: colluding rows 1e6 x the scale away in a
        random direction, opposite to the honest mean, and all +1e30."""
        for trial in range(min(self.trials, 2)):
            g = honest_rows(self.n - fp, self.d, "non-iid", self.seed * 1000 + trial).to(self.device)
            if fp == 0:
                far = [g[:0]]
            else:
                mean, size = g.mean(0), float(g.norm(dim=1).max())
                far = [attack_rows("large_norm", g.cpu(), fp, trial).to(self.device),
                       (mean - 1e6 * size * mean / mean.norm()).expand(fp, -1),
                       torch.full((fp, self.d), CORRUPT, dtype=g.dtype, device=self.device)]
            for byz in far:
                x, mask = with_attack(g, byz)
                try:
                    out = self.s(x, fp, mask.to(self.device), trial)
                except Exception as e:
                    self.raised = self.raised or f"at f'={fp}: {_first_line(e)}"
                    return False
                if not distance(out, g) <= error_bound(g):
                    return False
        return True

    def kappas(self) -> Dict[Tuple[str, str], float]:
        out = {}
        for family in FAMILIES:
            for kind in ("iid", "non-iid"):
                worst = 0.0
                for trial in range(self.trials):
                    x, mask, g = self.inputs(trial, kind, family)
                    try:
                        worst = max(worst, _order(kappa(self.call(x, mask, trial), g)))
                    except Exception as e:
                        self.raised = self.raised or f"under {family}: {_first_line(e)}"
                        worst = math.inf
                out[(family, kind)] = worst
        return out


def run(rule: Union[str, type, Callable], n: int = 10, f: int = 2, d: int = 20, trials: int = 5,
        seed: int = 0, device: str = "cpu", **params) -> Report:
    """The report of every property on `rule` (a name, an Aggregator subclass or a function) with
    its keywords `params`, on n rows of which f are Byzantine, d coordinates. A ConfigError for
    arguments the check cannot use (an unknown rule, f outside the rule's declared range)."""
    if not (isinstance(n, int) and isinstance(f, int) and isinstance(d, int) and n >= 2 and 0 <= f < n - 1 and d >= 2):
        raise ConfigError(f"--n {n} --f {f} --d {d}: need n >= 2, 0 <= f <= n - 2 (two honest rows) and d >= 2")
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"--trials {trials}: give at least 1")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    try:
        subject = Subject(rule, params)
    except ConfigError as e:    # the plug-in loader names the config key; here it is the argument
        raise ConfigError(str(e).replace("config key aggregator.name: ", "RULE: ", 1)) from None
    report = Report(subject.name, n, f, d, trials)
    for key in subject.exempt:
        if key not in PROPERTIES:
            raise ConfigError(f"rule {subject.name}: exempt names '{key}', which is not one of "
                              f"{', '.join(PROPERTIES)}")
    try:
        ok, why = subject.declared(n, f)
        subject.build(n, f)
    except ConfigError as e:
        raise ConfigError(f"rule {subject.name} with {params or 'its defaults'}: {e}") from None
    except Exception as e:
        report.rows.append(Row("shape", "FAIL", f"cannot be built for m={n}, f={f}: {_first_line(e)}"))
        return report
    if not ok:
        raise ConfigError(f"--f {f}: rule {subject.name} needs {why} at m={n}; lower --f or raise --n")
    checker = Checker(subject, n, f, d, trials, seed, device)
    robust = "bounded" not in subject.exempt
    for key in PROPERTIES:
        reason = subject.exempt.get(key) or (None if robust or key not in ("breakdown", "kappa")
                                             else "the rule declares it is not robust (see the bounded row)")
        if key == "kappa":
            checker.raised = None
            try:
                report.kappa = checker.kappas()
            except Exception as e:
                report.rows.append(Row(key, "FAIL", _first_line(e)))
                continue
        if reason:
            report.rows.append(Row(key, "exempt", reason))
            continue
        if key == "kappa":
            value, where = report.worst_kappa
            good = value <= KAPPA_LIMIT
            report.rows.append(Row(key, "pass" if good else "FAIL",
                                   f"worst {_num(value)} ({where})" + ("" if good else f" > {KAPPA_LIMIT:g}")
                                   + (f"; it raised {checker.raised}" if checker.raised else "")))
            continue
        try:
            passed, detail = getattr(checker, key)()
        except Exception as e:
            passed, detail = False, _first_line(e)
        report.rows.append(Row(key, "pass" if passed else "FAIL", detail))
    return report


# ---------------------------------------------------------------------------- command line

def _value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m byzddp.check", description=__doc__.split("\n")[0])
    parser.add_argument("rule", help="a built-in rule (krum, cm, ...) or package.module:attr")
    parser.add_argument("keywords", nargs="*", help="the rule's keywords, key=value (e.g. b=1)")
    parser.add_argument("--n", type=int, default=10, help="rows the rule sees (default 10)")
    parser.add_argument("--f", type=int, default=2, help="of them Byzantine, told to the rule (default 2)")
    parser.add_argument("--d", type=int, default=20, help="coordinates (default 20)")
    parser.add_argument("--trials", type=int, default=5, help="random inputs per property (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_intermixed_args(argv)
    try:
        params = {}
        for word in args.keywords:
            key, eq, value = word.partition("=")
            if not eq or not key:
                raise ConfigError(f"rule keyword '{word}': write key=value, e.g. b=1")
            params[key] = _value(value)
        report = run(args.rule, args.n, args.f, args.d, args.trials, args.seed, args.device, **params)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
