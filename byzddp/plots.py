"""The sweep's figures, drawn with matplotlib (Agg backend, PNG files).

Three kinds, each a function from plain data to a PNG, so they are usable outside a sweep:
- `accuracy_curves`: test accuracy over steps, one panel per (row, column), one colour per
  series, mean over seeds with a min-max band; reference series (f = 0) dotted;
- `selection_histogram`: how often each logical worker was selected by the rule (Krum),
  Byzantine workers in red and hatched; with a rotating Byzantine set (no fixed ids) the
  bars are not split and the panel says so;
- `heatmap`: final accuracy over (rule x attack), one grid per split value, numbers written in;
- `diagnostic_curves`: per row (a setting), test accuracy beside the server's per-round
  diagnostics (empirical kappa on a log scale, the Byzantine and honest selection rates),
  one colour per series, mean over seeds with a min-max band.
`byzddp.sweep.figures` gathers the data from run folders and calls these. Files are written
with byzddp.io.write_atomic: a reader never sees half a PNG.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from byzddp import io as run_io  # noqa: E402

Curve = Tuple[Sequence[float], Sequence[float]]  # (steps, accuracy in [0, 1]) of one seed


@dataclass
class Series:
    """One line of an accuracy panel: the same setting over several seeds."""
    label: str
    colour: int                      # index into the colour cycle: same index, same colour
    curves: List[Curve] = field(default_factory=list)
    dotted: bool = False             # reference (f = 0) lines are dotted


def mean_band(curves: Sequence[Curve], factor: float = 100.0
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean, min and max over seeds, times `factor` (percent by default).

    Seeds are compared at the steps they all evaluated; where they share none (a run cut
    short), each step is averaged over the seeds that have it.
    """
    tables = [dict(zip((int(s) for s in steps), (float(a) for a in acc))) for steps, acc in curves]
    tables = [t for t in tables if t]
    if not tables:
        empty = np.zeros(0)
        return empty, empty, empty, empty
    common = set.intersection(*(set(t) for t in tables))
    steps = sorted(common) if common else sorted(set().union(*tables))
    mean, lo, hi = [], [], []
    for s in steps:
        values = [factor * t[s] for t in tables if s in t]
        mean.append(sum(values) / len(values))
        lo.append(min(values))
        hi.append(max(values))
    return np.array(steps), np.array(mean), np.array(lo), np.array(hi)


def _save(fig, path: Path) -> Path:
    """Render the PNG in memory, then write it in one rename: no half-written figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    run_io.write_atomic(path, buf.getvalue())
    return path


def _finish(fig, axes, title: Optional[str], path: Path) -> Path:
    """The title, the layout and one legend for the figure (the same series recur in every
    panel), then the file."""
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    handles: dict = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="upper center",
                   bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 4), fontsize=8, frameon=False)
    return _save(fig, path)


def _colour(i: int):
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return cycle[i % len(cycle)]


def _panel_grid(n_rows: int, n_cols: int, width: float, height: float, sharey: bool = False):
    fig, axes = plt.subplots(max(n_rows, 1), max(n_cols, 1), squeeze=False, sharey=sharey,
                             figsize=(width * max(n_cols, 1), height * max(n_rows, 1)))
    return fig, axes


def accuracy_curves(panels: Dict[Tuple[str, str], List[Series]], rows: Sequence[str],
                    columns: Sequence[str], path: Path, title: str = "") -> Path:
    """One panel per (row, column) label pair; '' is the label of a missing dimension."""
    fig, axes = _panel_grid(len(rows), len(columns), 3.6, 2.8, sharey=True)  # comparable panels
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            ax = axes[i][j]
            drawn = False
            for series in panels.get((r, c), []):
                steps, mean, lo, hi = mean_band(series.curves)
                if len(steps) == 0:
                    continue
                colour = _colour(series.colour)
                ax.plot(steps, mean, color=colour, linestyle=":" if series.dotted else "-",
                        linewidth=1.6, label=series.label)
                if len(series.curves) > 1:
                    ax.fill_between(steps, lo, hi, color=colour, alpha=0.15, linewidth=0)
                drawn = True
            ax.set_title(" / ".join(x for x in (r, c) if x), fontsize=9)
            ax.grid(True, alpha=0.3)
            if i == len(rows) - 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("test accuracy (%)")
            if not drawn:
                ax.text(0.5, 0.5, "no finished runs", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8, color="grey")
    return _finish(fig, axes, title, path)


@dataclass
class Selection:
    """Krum's picks over a run (summed over seeds): count per logical worker."""
    counts: List[int]
    byzantine: Optional[List[int]]   # logical worker ids that were Byzantine; None: rotating set

    @property
    def split(self) -> bool:
        """Whether the counts split into honest and Byzantine workers (a fixed set)."""
        return self.byzantine is not None


def selection_fractions(counts: Sequence[int]) -> np.ndarray:
    """Share of all selections that went to each worker (sums to 1; zeros if none)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return c / total if total > 0 else c


ROTATING = "worker (Byzantine set rotates each step: no split; dashed: 1/n)"


def selection_label(sel: Selection) -> str:
    """What the bars' colours mean: which workers were Byzantine, or that no fixed set was."""
    if not sel.split:
        return ROTATING
    return "worker (red: Byzantine; dashed: 1/n)" if sel.byzantine else "worker (dashed: 1/n)"


def selection_histogram(panels: Dict[Tuple[str, str], Selection], rows: Sequence[str],
                        columns: Sequence[str], path: Path, title: str = "") -> Path:
    fig, axes = _panel_grid(len(rows), len(columns), 3.4, 2.6)
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            ax = axes[i][j]
            sel = panels.get((r, c))
            ax.set_title(" / ".join(x for x in (r, c) if x), fontsize=9)
            if sel is None or not sel.counts:
                ax.text(0.5, 0.5, "no selection counts", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8, color="grey")
                continue
            share = selection_fractions(sel.counts)
            workers = np.arange(len(share))
            bad = set(sel.byzantine or ())
            colours = ["tab:red" if w in bad else ("tab:blue" if sel.split else "tab:grey")
                       for w in workers]
            bars = ax.bar(workers, share, color=colours)
            for w, bar in zip(workers, bars):
                if w in bad:
                    bar.set_hatch("//")
            # Even use of the workers would put every bar at 1/n.
            ax.axhline(1.0 / len(share), color="grey", linestyle="--", linewidth=1)
            ax.set_xticks(workers)
            ax.tick_params(axis="x", labelsize=7)
            ax.set_xlabel(selection_label(sel), fontsize=None if sel.split else 7)
            if j == 0:
                ax.set_ylabel("share of selections")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


@dataclass
class Matrix:
    """One heatmap: values in percent, NaN where no run finished."""
    title: str
    rows: List[str]
    columns: List[str]
    values: np.ndarray               # shape (len(rows), len(columns))
    row_axis: str = ""
    column_axis: str = ""


def heatmap(matrices: Sequence[Matrix], path: Path, label: str = "test accuracy (%)") -> Path:
    fig, axes = plt.subplots(1, max(len(matrices), 1), squeeze=False,
                             figsize=(max(3.0, 0.9 * max((len(m.columns) for m in matrices), default=1) + 1.6)
                                      * max(len(matrices), 1),
                                      0.45 * max((len(m.rows) for m in matrices), default=1) + 1.8))
    image = None
    for k, m in enumerate(matrices):
        ax = axes[0][k]
        values = np.asarray(m.values, dtype=np.float64)
        image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=100.0, cmap="viridis",
                          aspect="auto")
        ax.set_xticks(range(len(m.columns)))
        ax.set_xticklabels(m.columns, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(m.rows)))
        ax.set_yticklabels(m.rows, fontsize=8)
        ax.set_title(m.title, fontsize=9)
        ax.set_xlabel(m.column_axis, fontsize=8)
        if k == 0:
            ax.set_ylabel(m.row_axis, fontsize=8)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                v = values[i, j]
                text = "-" if math.isnan(v) else f"{v:.1f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if math.isnan(v) or v < 60 else "black")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label=label, shrink=0.9)
    return _save(fig, path)


@dataclass
class Quantity:
    """One column of the diagnostics figure: a per-round key of metrics.jsonl."""
    key: str
    label: str                       # the y axis
    factor: float = 1.0              # 100: a share in [0, 1] shown in %
    log: bool = False                # kappa spans orders of magnitude across rules and attacks


def diagnostic_curves(panels: Dict[Tuple[str, str], List[Series]], rows: Sequence[str],
                      quantities: Sequence[Quantity], path: Path, title: str = "") -> Path:
    """One row per setting, one column per quantity; panels keyed by (row, quantity key)."""
    fig, axes = plt.subplots(max(len(rows), 1), len(quantities), squeeze=False, sharex=True,
                             sharey="col", figsize=(3.3 * len(quantities), 2.5 * max(len(rows), 1)))
    for i, r in enumerate(rows):
        for j, q in enumerate(quantities):
            ax = axes[i][j]
            drawn = False
            for series in panels.get((r, q.key), []):
                steps, mean, lo, hi = mean_band(series.curves, q.factor)
                if len(steps) == 0:
                    continue
                colour = _colour(series.colour)
                ax.plot(steps, mean, color=colour, linestyle=":" if series.dotted else "-",
                        linewidth=1.4, label=series.label, marker="." if len(steps) < 3 else None)
                if len(series.curves) > 1:
                    ax.fill_between(steps, lo, hi, color=colour, alpha=0.15, linewidth=0)
                drawn = True
            if q.factor == 100.0:
                ax.set_ylim(-3, 103)     # shares: the whole range, comparable across rows
            if drawn and q.log and all((mean > 0).all() for mean in
                                       (line.get_ydata() for line in ax.get_lines())):
                ax.set_yscale("log")
            if i == 0:
                ax.set_title(q.label, fontsize=9)
            if j == 0 and r:
                ax.set_ylabel(r, fontsize=8)
            if i == len(rows) - 1:
                ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=7)
            if not drawn:
                ax.text(0.5, 0.5, "not recorded", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8, color="grey")
    return _finish(fig, axes, title, path)
