"""Results of a sweep: results.csv, results.md, paired.csv and (byzddp/sweep/figures.py) the plots.

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
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import byzddp.sweep.paired as paired_mod
from byzddp.sweep.grid import Sweep
from byzddp.sweep.records import (HIGHER_IS_WORSE, METRICS, Record, WORST, collect, compared_metrics,
                                  format_cell, format_worst, percent, recorded, scale, tables, write_text)
from byzddp.sweep.figures import draw_plots


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


def write_paired(sweep: Sweep, pairs: List[paired_mod.Paired]) -> Path:
    return write_text(sweep.out / "paired.csv", paired_mod.to_csv(sweep, pairs))


def write_report(sweep: Sweep) -> Dict[str, Any]:
    records = collect(sweep)
    pairs = paired_mod.paired(sweep, records, compared_metrics(sweep, records))
    return {"csv": write_csv(sweep, records), "markdown": write_markdown(sweep, records, pairs),
            "paired": write_paired(sweep, pairs), "plots": draw_plots(sweep, records)}
