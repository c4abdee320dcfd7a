"""Results of a sweep: records of its runs, results.csv, results.md and the plots.

results.md holds one table per value of the split axes: `metric` (accuracies and rates in %),
mean +- sample std over seeds per (row, column) and, with two seeds or more, the 95% Student t
interval of the mean in brackets, an extra column (or row) for the reference runs, and, when
the table's columns include the attack axis (an axis that sets attack.name), a worst-case
column: per row, the lowest seed mean over the row's attack cells (attack.name none is not
an attack) and which column it was, e.g. "41.20 (alie)". Runs that recorded the server's
diagnostics (summary.json's mean_kappa, ...) get tables of those too, and a "Paired
differences" section compares each axis's values against its baseline seed by seed
(byzddp/sweep/paired.py; also paired.csv). Plots are drawn by byzddp.plots
from the same records; Krum's selection counts mark the Byzantine workers only where the
run's set was fixed (the last f): a rotating set (attack.rotate) is a fresh draw per step,
so counts summed over steps have no honest/Byzantine split, and the plot says so.
"""
from __future__ import annotations

import csv
import io
import json
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


def write_csv(sweep: Sweep, records: List[Record]) -> Path:
    """One row per run: id, role, status, the axis values, the seed and the summary numbers."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    axes = [a.name for a in sweep.axes]
    writer.writerow(["run_id", "role", "status", *axes, "seed", *METRICS])
    for r in records:
        s = r.summary or {}
        writer.writerow([r.run.id, r.run.role, r.status, *(r.run.point.get(a, "") for a in axes),
                         r.run.seed, *("" if recorded(s, m) is None else recorded(s, m) for m in METRICS)])
    return write_text(sweep.out / "results.csv", buf.getvalue())


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


def write_markdown(sweep: Sweep, records: List[Record],
                   pairs: Optional[List[paired_mod.Paired]] = None) -> Path:
    t = sweep.table
    done = sum(r.status == "done" for r in records)
    metrics = compared_metrics(sweep, records)
    several = len(sweep.seeds) > 1
    worse = ", ".join(m for m in metrics if m in HIGHER_IS_WORSE)
    worse = f"; the highest for {worse}" if worse else ""
    spread = (f"mean +- std over seeds {', '.join(map(str, sweep.seeds))} (sample std, n - 1) and in "
              f"brackets the 95% confidence interval of the mean (Student t, n - 1 degrees of freedom)"
              if several else f"one seed ({sweep.seeds[0]}): single runs, no standard deviation and "
                              f"no confidence interval")
    lines = [f"# Sweep {sweep.name}", "",
             f"{' and '.join(metrics)}; accuracies and rates in %; {spread}; (k/n): only k of n "
             f"seeds finished; -: none finished; {WORST}: the row's worst mean under attack (the "
             f"lowest{worse}), and which. "
             f"Runs finished: {done}/{len(records)}.", ""]
    for metric in metrics:
        if len(metrics) > 1:
            lines += [f"## {metric}", ""]
        lines += _metric_tables(sweep, records, metric, "###" if len(metrics) > 1 else "##")
    if pairs is None:
        pairs = paired_mod.paired(sweep, records, metrics)
    lines += _paired_section(sweep, pairs, [t["metric"], *t.get("also", [])])
    unfinished = [r.run.id for r in records if r.status == "unfinished"]
    if unfinished:
        lines += [f"Started but not finished ({len(unfinished)}); logs in {sweep.out / 'logs'}:", ""]
        lines += [f"- {i}" for i in unfinished] + [""]
    return write_text(sweep.out / "results.md", "\n".join(lines))


def _paired_section(sweep: Sweep, pairs: List[paired_mod.Paired], metrics: Sequence[str]) -> List[str]:
    lines = ["## Paired differences", ""]
    baselines = ", ".join(f"{a} = {v}" for a, v in sweep.baseline.items()
                          if len(sweep.axis(a).values) > 1)
    if not baselines:
        return lines + ["No axis has two values: nothing to compare.", ""]
    lines += [f"Each arm against its axis's baseline ({baselines}), seed by seed: the runs of a pair "
              f"have the same seed and the same values of every other axis (the cell). Mean "
              f"difference arm - baseline over the seeds where both finished"
              + (", its 95% confidence interval (Student t over the per-seed differences)" if len(sweep.seeds) > 1
                 else "; one seed, so no confidence interval (-)")
              + "; wins: seeds where the arm did better. honest draws: shared when both runs give "
                "every worker honest in both the same model initialisation and the same batches at "
                "every step (same seed, same shards); differ names what does not match (shards: "
                "attack none gives all n workers a shard, an attack the n - f honest ones), and there "
                "the pairing removes less of the seed's noise. Every row is in paired.csv.", ""]
    for metric in metrics:
        unit = " (points of %)" if percent(metric) else ""
        heading = "###" if len(metrics) == 1 else "####"
        if len(metrics) > 1:
            lines += [f"### {metric}", ""]
        lines += paired_mod.markdown(sweep, pairs, metric, scale(metric), unit, heading)
    return lines


def _metric_tables(sweep: Sweep, records: List[Record], metric: str, heading: str) -> List[str]:
    t, lines = sweep.table, []
    in_percent = percent(metric)
    for table in tables(sweep, records, t["rows"], t["columns"], t["split"], metric):
        if table.title:
            lines += [f"{heading} {table.title}", ""]
        columns = [c or metric for c in table.columns] + ([WORST] if table.attacks else [])
        lines.append("| " + " | ".join([", ".join(t["rows"]) or "sweep", *columns]) + " |")
        lines.append("|" + "---|" * (len(columns) + 1))
        for r in table.rows:
            cells = [format_cell(table.cells.get((r, c), []), len(sweep.seeds), in_percent)
                     for c in table.columns]
            if table.attacks:
                cells.append(format_worst(table.worst(r), in_percent))
            lines.append("| " + " | ".join([r or sweep.name, *cells]) + " |")
        lines.append("")
    return lines


def read_curve(run_dir: Path, key: str = "test_accuracy") -> Tuple[List[int], List[float]]:
    """(steps, values of `key`) from metrics.jsonl: the lines that hold a number for it (a
    line cut by a crash, or one without the key, is skipped)."""
    steps, values = [], []
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return steps, values
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            value = rec[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            steps.append(int(rec["step"]))
            values.append(float(value))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return steps, values


def byzantine_ids(summary: dict, n: int) -> Optional[set]:
    """The run's Byzantine workers as it recorded them: the last f real ones under the
    last_f policy (summaries from before the policy was recorded: the same); None under a
    rotating set, which is drawn afresh each step and so has no ids over the whole run."""
    if summary.get("byzantine_policy", "last_f") != "last_f":
        return None
    real = summary.get("byzantine_real")
    if isinstance(real, int) and not isinstance(real, bool) and real > 0:
        return set(range(n - real, n))
    return set()


def selection_total(records: Sequence[Record]) -> Optional[Tuple[List[int], Optional[List[int]]]]:
    """Selection counts summed over runs (seeds), and the Byzantine worker ids (None when a
    run's set rotated: then no split of the counts into honest and Byzantine is defined)."""
    counts: Optional[List[int]] = None
    byzantine: Optional[set] = set()
    for rec in records:
        got = (rec.summary or {}).get("selection_counts")
        if not got:
            continue
        counts = list(got) if counts is None else [a + b for a, b in zip(counts, got)]
        ids = byzantine_ids(rec.summary, len(got))
        byzantine = None if ids is None or byzantine is None else byzantine | ids
    if counts is None:
        return None
    return counts, None if byzantine is None else sorted(byzantine)


def _file(sweep: Sweep, plot: dict, index: int, figure: Dict[str, str]) -> str:
    """curves.png, or curves-momentum0.9.png for one value of an axis the plot leaves out."""
    stem = plot["file"] or (plot["kind"] if index == 0 else f"{plot['kind']}{index + 1}")
    stem = stem[:-4] if stem.endswith(".png") else stem
    parts = [next(v.segment for v in sweep.axis(a).values if v.label == label)
             for a, label in figure.items()]
    return "-".join([stem, *parts]) + ".png"


def draw_plots(sweep: Sweep, records: List[Record]) -> List[Path]:
    """Every plot the grid asks for; a plot with no finished run to show is skipped."""
    import numpy as np

    from byzddp import plots as P

    written: List[Path] = []
    counters: Dict[str, int] = {}
    folder = sweep.out / "plots"
    for plot in sweep.plots + _default_diagnostics(sweep):
        index = counters[plot["kind"]] = counters.get(plot["kind"], -1) + 1
        recs = where_(sweep, records, plot["where"])
        rows, columns = plot["rows"], plot["columns"]
        if plot["kind"] == "diagnostics":
            written += _diagnostics(sweep, plot, index, recs, folder)
            continue
        if plot["kind"] == "heatmap":
            mats = []
            for t in tables(sweep, recs, rows, columns, plot["split"], sweep.table["metric"]):
                values = np.full((len(t.rows), len(t.columns)), np.nan)
                for (r, c), v in t.cells.items():
                    values[t.rows.index(r), t.columns.index(c)] = sum(v) / len(v)
                mats.append(P.Matrix(t.title or sweep.name, t.rows, t.columns, values,
                                     ", ".join(rows), ", ".join(columns)))
            if any(not np.isnan(m.values).all() for m in mats):
                written.append(P.heatmap(mats, folder / _file(sweep, plot, index, {}),
                                         label=f"{sweep.table['metric']} (%)"))
            continue
        hue = plot["hue"] if plot["kind"] == "curves" else []
        row_sets, col_sets = combos(sweep, rows), combos(sweep, columns)
        row_names = [titled(sweep, r) for r in row_sets]
        col_names = [titled(sweep, c) for c in col_sets]
        # One figure per combination of the axes this plot does not name.
        for figure in combos(sweep, _rest(sweep, rows, columns, hue)):
            if plot["kind"] == "curves":
                panels: Dict[Tuple[str, str], List[Any]] = {}
                for rl in row_sets:
                    for cl in col_sets:
                        for k, hl in enumerate(combos(sweep, hue)):
                            want = {**figure, **rl, **cl, **hl}
                            name = titled(sweep, hl) or sweep.name
                            for role, dotted, label in (("main", False, name),
                                                        ("reference", True, f"{name} ({sweep.reference_label})")):
                                if role == "reference" and k > 0 and set(hue) & set(sweep.dropped):
                                    continue  # the reference does not vary with the hue: once
                                found = select(recs, want, role)
                                if found:
                                    panels.setdefault((titled(sweep, rl), titled(sweep, cl)), []).append(
                                        P.Series(label, k, [read_curve(x.run_dir) for x in found], dotted))
                if panels:
                    written.append(P.accuracy_curves(
                        panels, row_names, col_names, folder / _file(sweep, plot, index, figure),
                        title=sweep.name + (f": {titled(sweep, figure)}" if figure else "")))
            else:
                chosen: Dict[Tuple[str, str], Any] = {}
                for rl in row_sets:
                    for cl in col_sets:
                        total = selection_total(select(recs, {**figure, **rl, **cl}, "main"))
                        if total is not None:
                            chosen[(titled(sweep, rl), titled(sweep, cl))] = P.Selection(*total)
                if chosen:
                    written.append(P.selection_histogram(
                        chosen, row_names, col_names, folder / _file(sweep, plot, index, figure),
                        title=f"{sweep.name}: selections" + (f" ({titled(sweep, figure)})" if figure else "")))
    return written


DIAGNOSTIC_ROWS = 8     # a default diagnostics figure taller than this is split by columns


def _default_diagnostics(sweep: Sweep) -> List[dict]:
    """Without a diagnostics plot in the grid: one laid out as the first curves plot, its
    panels as rows (split into one figure per column value when that makes too many rows)."""
    if any(p["kind"] == "diagnostics" for p in sweep.plots):
        return []
    curves = next((p for p in sweep.plots if p["kind"] == "curves"), None)
    if curves is None:
        return []
    rows = curves["rows"] + curves["columns"]
    if len(combos(sweep, rows)) > DIAGNOSTIC_ROWS and curves["columns"]:
        rows = curves["rows"]
    return [{"kind": "diagnostics", "file": None, "rows": rows, "columns": [],
             "hue": curves["hue"], "where": curves["where"]}]


def _diagnostics(sweep: Sweep, plot: dict, index: int, recs: List[Record], folder: Path) -> List[Path]:
    """Test accuracy beside kappa and the selection rates over steps, one row per setting of
    the plot's rows, one figure per value of the axes it leaves out; written only where some
    run recorded a diagnostic."""
    from byzddp import plots as P

    quantities = [P.Quantity(key, label, scale(key) if key != "kappa" else 1.0, key == "kappa")
                  for key, label in CURVE_KEYS]
    rows, hue = plot["rows"], plot["hue"]
    row_sets = combos(sweep, rows)
    written = []
    for figure in combos(sweep, _rest(sweep, rows, hue)):
        panels: Dict[Tuple[str, str], List[Any]] = {}
        recorded = False
        for rl in row_sets:
            for k, hl in enumerate(combos(sweep, hue)):
                found = select(recs, {**figure, **rl, **hl}, "main")
                if not found:
                    continue
                for q in quantities:
                    curves = [read_curve(x.run_dir, q.key) for x in found]
                    if any(steps for steps, _ in curves):
                        recorded = recorded or q.key != "test_accuracy"
                        panels.setdefault((titled(sweep, rl), q.key), []).append(
                            P.Series(titled(sweep, hl) or sweep.name, k, curves))
        if recorded:
            written.append(P.diagnostic_curves(
                panels, [titled(sweep, r) for r in row_sets], quantities,
                folder / _file(sweep, plot, index, figure),
                title=f"{sweep.name}: diagnostics" + (f" ({titled(sweep, figure)})" if figure else "")))
    return written


def write_paired(sweep: Sweep, pairs: List[paired_mod.Paired]) -> Path:
    return write_text(sweep.out / "paired.csv", paired_mod.to_csv(sweep, pairs))


def write_report(sweep: Sweep) -> Dict[str, Any]:
    records = collect(sweep)
    pairs = paired_mod.paired(sweep, records, compared_metrics(sweep, records))
    return {"csv": write_csv(sweep, records), "markdown": write_markdown(sweep, records, pairs),
            "paired": write_paired(sweep, pairs), "plots": draw_plots(sweep, records)}
