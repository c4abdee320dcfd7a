"""Helpers for a researcher's own tests.

    from byzddp.testing import check_rule

    def test_my_rule_is_sound():
        check_rule("mypackage.rules:my_rule", n=10, f=2)   # or the function / class itself

`check_rule` runs every property of `python -m byzddp.check` (docs/check.md) and raises
AssertionError with the whole table when one fails; it returns the Report otherwise.
"""
from __future__ import annotations

from byzddp import check


def check_rule(rule, n: int = 10, f: int = 2, d: int = 20, trials: int = 3, seed: int = 0,
               device: str = "cpu", **params) -> check.Report:
    report = check.run(rule, n=n, f=f, d=d, trials=trials, seed=seed, device=device, **params)
    if not report.ok:
        raise AssertionError(f"rule {report.rule} fails {', '.join(report.failed)}:\n{report.table()}")
    return report
