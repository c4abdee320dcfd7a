"""python -m byzddp.check and byzddp.testing.check_rule: every built-in and example rule passes
(with its declared exceptions), and rules broken in the ways the field's trackers report (an
FLTrust that ignores its root, a Krum that picks the wrong end, a requirement in the wrong
direction, order dependence, an input written into, randomness from the global stream) each
fail the property they break, with exit status 1 and no traceback."""
import subprocess
import sys

import pytest
import torch

from byzddp import aggregators, check
from byzddp.aggregators import Aggregator
from byzddp.aggregators.coordinate import CoordinateMedian
from byzddp.aggregators.krum import Krum, krum_scores
from byzddp.errors import ConfigError
from byzddp.geometry import pairwise_squared_distances
from byzddp.testing import check_rule
from helpers import ROOT, env

FAST = dict(d=12, trials=2)
# The properties each built-in rule declares it lacks (its `exempt`), by design.
DECLARED = {"mean": {"bounded"}, "cclip": {"identical", "translation"}, "rfa": {"translation"},
            "bulyan": {"permutation"}, "signguard": {"translation", "permutation"}, "fltrust": {"translation"},
            "monna": {"permutation"}, "mda": {"permutation"}}


def _statuses(report):
    return {row.key: row.status for row in report.rows}


@pytest.mark.parametrize("name", aggregators.RULES)
def test_every_built_in_rule_passes_with_its_declared_exceptions(name):
    n = 11 if name == "bulyan" else 10      # bulyan needs 4f+3 <= m
    report = check_rule(name, n=n, f=2)      # the command line's defaults: d = 20, 5 trials
    statuses = _statuses(report)
    assert set(statuses) == set(check.PROPERTIES)
    exempt = {k for k, s in statuses.items() if s == "exempt"}
    implied = {"breakdown", "kappa"} if "bounded" in DECLARED.get(name, ()) else set()
    assert exempt == DECLARED.get(name, set()) | implied
    for row in report.rows:
        if row.status == "exempt" and row.key not in implied:
            assert row.detail == aggregators.rule_class(name).exempt[row.key]   # the reason, printed
    assert {fam for fam, _ in report.kappa} == set(check.FAMILIES)
    assert all(v >= 0 for v in report.kappa.values())


@pytest.mark.parametrize("rule", ["examples.my_rule:norm_clipped_mean", "examples.my_rule:NormFilter"])
def test_the_example_rules_pass(rule):
    check_rule(rule, **FAST)


# ---------------------------------------------------------------------------- broken rules

def order_dependent(x):
    return x[0].clone()


def writes_its_input(x):
    x[-1] = 0
    return x.mean(0)


def wrong_shape(x):
    return x.mean(1)


def global_randomness(x):
    return x.median(0).values + 1e-3 * torch.randn(x.shape[1], dtype=x.dtype)


def raises(x):
    raise RuntimeError("boom")


class FLTrustAsFedAvg(Aggregator):
    """Takes the root gradient and never looks at it: the mean."""
    name = "fltrust_as_fedavg"
    trusted_root = True

    def aggregate(self, grads, columns=None, root_gradient=None):
        return super().aggregate(grads, columns)

    def _aggregate(self, x, cols):
        return x.mean(0)


class KrumTakingTheMax(Krum):
    """A hand-patched Krum: the row with the largest score."""
    name = "krum_max"

    def _aggregate(self, x, cols):
        dist, _ = pairwise_squared_distances(x, cols)
        return x[int(krum_scores(dist, self.f).argmax())]


class MedianWithReversedRequirement(CoordinateMedian):
    """The median declaring 2f+1 >= m instead of <= m (a check in the wrong direction)."""
    name = "cm_reversed"

    @classmethod
    def requirements(cls, m, fp, params):
        return [(2 * fp + 1 >= m, "2f'+1 >= m", "", None)]


@pytest.mark.parametrize("rule, fails", [
    (order_dependent, {"permutation"}),
    (writes_its_input, {"input", "bounded"}),
    (wrong_shape, {"shape"}),
    (global_randomness, {"determinism", "identical", "translation"}),
    (FLTrustAsFedAvg, {"bounded", "breakdown", "kappa"}),
    (KrumTakingTheMax, {"bounded", "breakdown", "kappa"}),
    (MedianWithReversedRequirement, {"breakdown"}),
])
def test_a_broken_rule_fails_the_property_it_breaks(rule, fails):
    report = check.run(rule, n=10, f=2 if rule is not MedianWithReversedRequirement else 5, **FAST)
    failed = set(report.failed)
    assert fails <= failed, report.table()
    assert "FAILED: " in report.table()
    with pytest.raises(AssertionError, match="fails"):
        check_rule(rule, n=10, f=2 if rule is not MedianWithReversedRequirement else 5, **FAST)


def test_a_rule_that_raises_fails_every_property_in_one_line_each():
    report = check.run(raises, **FAST)
    assert report.failed and all("RuntimeError: boom" in r.detail for r in report.rows if r.status == "FAIL")


def test_the_breakdown_row_finds_the_median_breaking_at_half():
    """The coordinate-wise median of m = 10 rows holds while f' < m/2 colluding far rows and
    follows them from f' = 5; it declares 2f'+1 <= m, so f' <= 4."""
    row = {r.key: r for r in check.run("cm", **FAST).rows}["breakdown"]
    assert row.detail == "m=10: declared f' <= 4; breaks from f'=5"
    row = {r.key: r for r in check.run("krum", **FAST).rows}["breakdown"]
    assert row.detail.startswith("m=10: declared f' <= 3; breaks from f'=")


def test_kappa_is_the_definition_on_the_mean_under_ipm():
    """The mean of h honest rows and f rows of -eps mu is mu (h - f eps)/n: kappa by hand."""
    n, f, d = 10, 2, 12
    report = check.run("mean", n=n, f=f, d=d, trials=2)
    for kind in ("iid", "non-iid"):
        want = 0.0
        for trial in range(2):
            g = check.honest_rows(n - f, d, kind, trial)
            mu = g.mean(0)
            out = mu * (n - f - f * 0.1) / n
            want = max(want, float((out - mu).square().sum() / (g - mu).square().sum(1).mean()))
        assert report.kappa[("ipm", kind)] == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------------------- command line

def test_the_command_line_prints_the_table_and_exits_0(capsys):
    assert check.main(["trimmed_mean", "b=3", "--n", "9", "--d", "8", "--trials", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("byzddp.check trimmed_mean: n=9 rows, f=2")
    for title in check.PROPERTIES.values():
        assert title in out
    assert "worst" in out and out.rstrip().endswith("all properties hold")


@pytest.mark.parametrize("argv, key", [
    (["krum", "--f", "4"], "--f 4"),
    (["no_such_rule"], "no_such_rule"),
    (["trimmed_mean", "b"], "key=value"),
    (["trimmed_mean", "q=1"], "takes no parameter 'q'"),
    (["cm", "--n", "3", "--f", "2"], "--n 3"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, key, capsys):
    assert check.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and key in err and len(err.splitlines()) == 1


def test_an_exempt_key_that_is_not_a_property_is_refused():
    class Typo(CoordinateMedian):
        name = "typo"
        exempt = {"permutaton": "spelt wrong"}
    with pytest.raises(ConfigError, match="permutaton"):
        check.run(Typo, **FAST)


@pytest.mark.slow
def test_a_broken_plug_in_rule_exits_1_naming_it_without_a_traceback(tmp_path):
    (tmp_path / "broken_rules.py").write_text("def first_row(x):\n    return x[0] * 1.0\n")
    proc = subprocess.run([sys.executable, "-m", "byzddp.check", "broken_rules:first_row", "--trials", "2"],
                          cwd=ROOT, env={**env(), "PYTHONPATH": f"{ROOT}:{tmp_path}"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.rstrip().splitlines()[-1] == "FAILED: permutation invariance"
