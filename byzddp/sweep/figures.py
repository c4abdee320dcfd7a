"""A sweep's plots, drawn by byzddp.plots from its records: accuracy curves, heatmaps, Krum's
selection counts, and the server's diagnostics (kappa and the selection rates) over steps."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from byzddp.sweep.grid import Sweep, combos
from byzddp.sweep.grid import where as where_
from byzddp.sweep.records import (CURVE_KEYS, Record, _rest, scale, select, tables, titled)


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
