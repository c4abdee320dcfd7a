"""The records of a sweep's runs and the tables made of them: each run's status and summary,
the cells of a (rows x columns) table per value of the split axes with their worst case under
attack, and how a number is shown (accuracies and rates in %, mean +- std [95% CI])."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from byzddp import io as run_io
import byzddp.sweep.paired as paired_mod
from byzddp.sweep.grid import Resolver, Run, Sweep, combos
from byzddp.sweep.grid import where as where_
from byzddp.sweep.runner import read_summary, status
from byzddp.sweep.stats import mean_ci


# The server's per-round diagnostics, averaged over a run (summary.json), where recorded.
DIAGNOSTICS = ("mean_kappa", "mean_aggregation_error", "mean_honest_variance", "mean_update_cosine",
               "mean_byzantine_selection_rate", "mean_honest_selection_rate")


# Those results.md shows as tables (and compares in paired.csv) when the runs recorded them.
DIAGNOSTIC_TABLES = ("mean_kappa", "mean_byzantine_selection_rate", "mean_honest_selection_rate")


METRICS = ("final_test_accuracy", "final_test_accuracy_last5", "best_test_accuracy",
           "final_test_loss", "final_attack_success_rate", *DIAGNOSTICS, "steps", "wall_seconds",
           "byzantine_declared", "byzantine_real", "attack", "config_hash")


WORST = "worst case"


# Metrics an attacker drives up: their worst case is the highest mean, not the lowest.
HIGHER_IS_WORSE = paired_mod.LOWER_IS_BETTER


# Per-round keys of metrics.jsonl drawn by the diagnostics plot, with their axis labels.
CURVE_KEYS = (("test_accuracy", "test accuracy (%)"), ("kappa", "empirical kappa"),
              ("byzantine_selection_rate", "Byzantine selection rate (%)"),
              ("honest_selection_rate", "honest selection rate (%)"))


def percent(metric: str) -> bool:
    """Accuracies and rates (shares in [0, 1]) are shown in %; other metrics as they are."""
    return "accuracy" in metric or metric.endswith("_rate")


def scale(metric: str) -> float:
    return 100.0 if percent(metric) else 1.0


@dataclass
class Record:
    run: Run
    status: str                      # done | stale | pending | unfinished (started, no summary)
    summary: Optional[dict]
    run_dir: Path


def collect(sweep: Sweep) -> List[Record]:
    out = []
    for run in sweep.runs:
        run_dir = sweep.runs_dir / run.id
        state = status(sweep, run)
        if state == "pending" and (sweep.out / "logs" / f"{run.id}.log").exists():
            state = "unfinished"
        out.append(Record(run, state, read_summary(run_dir) if state == "done" else None, run_dir))
    return out


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    run_io.write_atomic(path, text)
    return path


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of a single value is 0."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def show(labels: Dict[str, str]) -> str:
    return ", ".join(labels.values())


def _short(key: str) -> str:
    """attack.name -> attack, data.partition -> partition, workers.momentum -> momentum."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def titled(sweep: Sweep, labels: Dict[str, str]) -> str:
    """Labels for a plot: case names as they are, grid values as key=value."""
    return ", ".join(v if sweep.axis(a).is_case else f"{_short(a)}={v}" for a, v in labels.items())


def select(records: Sequence[Record], want: Dict[str, str], role: str) -> List[Record]:
    """Finished runs of this role at these axis labels; a reference matches any value of
    the axes it dropped."""
    out = []
    for rec in records:
        if rec.status != "done" or rec.run.role != role:
            continue
        if all(rec.run.point.get(a, v) == v for a, v in want.items()):
            out.append(rec)
    return out


def _rest(sweep: Sweep, *used: Sequence[str]) -> List[str]:
    named = set().union(*map(set, used))
    return [a.name for a in sweep.axes if a.name not in named]


@dataclass
class Table:
    """Values over seeds per (row, column) of one split value (in % for accuracies and rates)."""
    title: str
    rows: List[str]
    columns: List[str]
    cells: Dict[Tuple[str, str], List[float]]   # metric values (scaled), one per seed
    attacks: List[str] = field(default_factory=list)  # the columns whose runs attack
    higher_is_worse: bool = False                     # the metric's worst case is its highest

    def worst(self, row: str) -> Optional[Tuple[float, str]]:
        """(worst seed mean, its column) over this row's attack cells: the lowest, or the highest
        for a metric an attacker drives up; None if none finished."""
        means = [(sum(v) / len(v), c) for c in self.attacks
                 for v in [self.cells.get((row, c))] if v]
        pick = max if self.higher_is_worse else min
        # A diverged cell (NaN: a run's loss was not finite) is the worst case whichever way.
        nan_is_worst = math.inf if self.higher_is_worse else -math.inf
        return pick(means, key=lambda m: nan_is_worst if math.isnan(m[0]) else m[0]) if means else None


def tables(sweep: Sweep, records: Sequence[Record], rows: Sequence[str], columns: Sequence[str],
           split: Sequence[str], metric: str, where: Optional[dict] = None) -> List[Table]:
    """The layout of results.md and of the heatmaps.

    Axes not named become part of the split. Reference runs (f = 0) get an extra column
    when they dropped a column axis (else an extra row when they dropped a row axis).
    When a column axis sets attack.name, `attacks` lists the columns whose runs attack.
    """
    records = where_(sweep, records, where or {})
    resolver = Resolver(sweep.base)
    by_attack = any("attack.name" in sweep.axis(a).keys for a in columns)

    def attacks(recs: List[Record]) -> bool:
        return bool(recs) and all(resolver.value("attack.name", x.run.overrides) != "none" for x in recs)

    split = list(split) + _rest(sweep, rows, columns, split)
    ref_col = bool(set(sweep.dropped) & set(columns))
    ref_row = not ref_col and bool(set(sweep.dropped) & set(rows))
    out = []
    for s in combos(sweep, split):
        row_sets, col_sets = combos(sweep, rows), combos(sweep, columns)
        cells: Dict[Tuple[str, str], List[float]] = {}
        attack_columns: set = set()

        def fill(r: str, c: str, recs: List[Record]) -> None:
            values = [scale(metric) * v for v in (_metric(x, metric) for x in recs) if v is not None]
            if values:
                cells[(r, c)] = values

        for rl in row_sets:
            for cl in col_sets:
                found = select(records, {**s, **rl, **cl}, "main")
                fill(show(rl), show(cl), found)
                if by_attack and attacks(found):
                    attack_columns.add(show(cl))
            if ref_col:
                fill(show(rl), sweep.reference_label, select(records, {**s, **rl}, "reference"))
        if ref_row:
            for cl in col_sets:
                fill(sweep.reference_label, show(cl), select(records, {**s, **cl}, "reference"))
        row_names = [show(r) for r in row_sets] + ([sweep.reference_label] if ref_row else [])
        col_names = [show(c) for c in col_sets] + ([sweep.reference_label] if ref_col else [])
        title = ", ".join(f"{a} = {v}" for a, v in s.items())
        out.append(Table(title, row_names, col_names, cells,
                         [c for c in col_names if c in attack_columns], metric in HIGHER_IS_WORSE))
    return out


def recorded(summary: Optional[dict], metric: str) -> Any:
    """A summary's value of `metric`; a non-finite number, written as null with its kind in
    `non_finite` (strict JSON), comes back as that float."""
    summary = summary or {}
    v, flags = summary.get(metric), summary.get("non_finite")
    flag = flags.get(metric) if isinstance(flags, dict) else None
    if v is None and flag in ("nan", "inf", "-inf"):
        return float(flag)
    return v


def _metric(rec: Record, metric: str) -> Optional[float]:
    v = recorded(rec.summary, metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def number(value: float, in_percent: bool = True) -> str:
    return f"{value:.2f}" if in_percent else f"{value:.4g}"


def format_cell(values: Sequence[float], seeds: int, in_percent: bool = True) -> str:
    """mean +- std [95% CI of the mean] over seeds; a single seed: its value alone."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    text = number(mean, in_percent)
    if len(values) > 1:
        _, low, high = mean_ci(values)
        text += f" +- {number(std, in_percent)} [{number(low, in_percent)}, {number(high, in_percent)}]"
    return text + (f" ({len(values)}/{seeds})" if len(values) < seeds else "")


def format_worst(worst: Optional[Tuple[float, str]], in_percent: bool = True) -> str:
    return "-" if worst is None else f"{number(worst[0], in_percent)} ({worst[1]})"


def diagnostics_present(records: Sequence[Record]) -> List[str]:
    """The diagnostic run means that some finished run recorded."""
    return [m for m in DIAGNOSTIC_TABLES if any(_metric(r, m) is not None for r in records)]


def compared_metrics(sweep: Sweep, records: Sequence[Record]) -> List[str]:
    """The table's metric, its `also` metrics, then the diagnostics the runs recorded."""
    metrics = [sweep.table["metric"], *sweep.table.get("also", [])]
    return metrics + [m for m in diagnostics_present(records) if m not in metrics]
