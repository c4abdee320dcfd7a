"""Plots: the numbers behind them (brute force) and valid PNG files from run folders."""
import json
import math
import random
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from byzddp import plots, sweep
from test_sweep import fake_finished, write_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
    assert image.std() > 0          # not a blank canvas


def test_mean_band_is_mean_min_max_in_percent_over_common_steps():
    curves = [([10, 20, 30], [0.1, 0.5, 0.9]),
              ([10, 20, 30, 40], [0.3, 0.2, 0.6, 0.7]),   # step 40 is not common: dropped
              ([10, 20, 30], [0.2, 0.8, 0.3])]
    steps, mean, lo, hi = plots.mean_band(curves)
    assert steps.tolist() == [10, 20, 30]
    for k, s in enumerate([10, 20, 30]):
        values = [100.0 * dict(zip(st, acc))[s] for st, acc in curves]
        assert mean[k] == pytest.approx(sum(values) / 3, abs=1e-12)
        assert lo[k] == min(values) and hi[k] == max(values)


def test_mean_band_without_common_steps_averages_what_is_there():
    steps, mean, lo, hi = plots.mean_band([([10, 20], [0.5, 0.7]), ([30], [0.9])])
    assert steps.tolist() == [10, 20, 30]
    assert mean.tolist() == pytest.approx([50.0, 70.0, 90.0])
    assert plots.mean_band([([], [])])[0].size == 0


def test_selection_fractions_sum_to_one():
    counts = [3, 0, 7, 10]
    share = plots.selection_fractions(counts)
    assert share.sum() == pytest.approx(1.0)
    assert share.tolist() == pytest.approx([c / 20 for c in counts])
    assert plots.selection_fractions([0, 0]).tolist() == [0.0, 0.0]


def test_each_kind_writes_a_valid_png_from_plain_data(tmp_path):
    rng = np.random.default_rng(0)
    steps = list(range(30, 301, 30))
    curve = lambda: (steps, list(np.clip(np.linspace(0.1, 0.9, len(steps)) + rng.normal(0, .02, len(steps)), 0, 1)))
    panels = {("bitflip", "krum"): [plots.Series("none", 0, [curve(), curve()]),
                                    plots.Series("none (f=0)", 0, [curve()], dotted=True)],
              ("bitflip", "cm"): [plots.Series("s_replacement", 1, [curve()])]}
    assert_png(plots.accuracy_curves(panels, ["bitflip"], ["krum", "cm", "rfa"], tmp_path / "c.png", "t"))
    sel = {("", "none"): plots.Selection([5, 1, 9, 0, 3], [3, 4]),
           ("", "s_replacement"): plots.Selection([4, 4, 4, 4, 4], [3, 4])}
    assert_png(plots.selection_histogram(sel, [""], ["none", "s_replacement"], tmp_path / "s.png"))
    m = plots.Matrix("none", ["krum", "cm"], ["bitflip", "mimic"], np.array([[50.0, np.nan], [91.2, 10.0]]))
    assert_png(plots.heatmap([m, m], tmp_path / "h.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "h.png", "s.png"]  # no temp files left


# ---------------------------------------------------------------------------- from a sweep

def fig3_like(tmp_path) -> sweep.Sweep:
    spec = {"name": "p",
            "set": {"workers.n": 6, "workers.byzantine": 1, "train.steps": 3, "data.partition": "sorted",
                    "aggregator.name": "cm"},
            "cases": {"rule": {"cm": {"aggregator.name": "cm"}, "mean": {"aggregator.name": "mean"}}},
            "grid": {"attack.name": ["bitflip", "labelflip"], "resampling.name": ["none", "s_replacement"]},
            "seeds": [0, 1],
            "reference": {"label": "f=0", "set": {"attack.name": "none", "workers.n": 5, "workers.byzantine": 0}},
            "table": {"rows": "rule", "columns": "attack.name", "split": "resampling.name"},
            "plots": [{"kind": "curves", "rows": "attack.name", "columns": "rule", "hue": "resampling.name"},
                      {"kind": "selection", "rows": "attack.name", "columns": "resampling.name",
                       "where": {"rule": "cm"}},
                      {"kind": "heatmap", "rows": "rule", "columns": "attack.name", "split": "resampling.name"},
                      {"kind": "curves", "columns": "attack.name", "hue": "resampling.name", "file": "by-rule"}]}
    return sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "out")


def fill(sw: sweep.Sweep):
    rnd = random.Random(1)
    curves, selections = {}, {}
    for run in sw.runs:
        curves[run.id] = [(s, rnd.uniform(0.1, 0.95)) for s in (10, 20, 30)]
        n = 5 if run.role == "reference" else 6
        selections[run.id] = [rnd.randint(0, 50) for _ in range(n)]
        fake_finished(sw, run, curves[run.id][-1][1], curve=curves[run.id], selection=selections[run.id])
    return curves, selections


def test_sweep_report_writes_every_plot_as_valid_png(tmp_path):
    sw = fig3_like(tmp_path)
    fill(sw)
    written = sweep.write_report(sw)["plots"]
    names = sorted(p.name for p in written)
    # The 4th plot does not name the rule axis: one figure per rule.
    assert names == ["by-rule-cm.png", "by-rule-mean.png", "curves.png", "heatmap.png", "selection-cm.png"]
    for p in written:
        assert p.parent == sw.out / "plots"
        assert_png(p)


def test_curves_get_each_panel_its_runs_and_the_reference_dotted(tmp_path, monkeypatch):
    sw = fig3_like(tmp_path)
    curves, _ = fill(sw)
    seen = {}
    monkeypatch.setattr(plots, "accuracy_curves",
                        lambda panels, rows, cols, path, title="": seen.setdefault(path.name, (panels, rows, cols)) and path)
    sweep.draw_plots(sw, sweep.collect(sw))
    panels, rows, cols = seen["curves.png"]
    assert rows == ["attack=bitflip", "attack=labelflip"] and cols == ["cm", "mean"]
    for attack in ("bitflip", "labelflip"):
        for rule in ("cm", "mean"):
            series = {s.label: s for s in panels[(f"attack={attack}", rule)]}
            assert set(series) == {"resampling=none", "resampling=none (f=0)",
                                   "resampling=s_replacement", "resampling=s_replacement (f=0)"}
            for res, colour in (("none", 0), ("s_replacement", 1)):
                main, ref = series[f"resampling={res}"], series[f"resampling={res} (f=0)"]
                assert not main.dotted and ref.dotted and main.colour == ref.colour == colour
                want = [tuple(zip(*curves[f"{rule}-{attack}-{res}-seed{s}"])) for s in (0, 1)]
                assert [tuple(map(tuple, c)) for c in main.curves] == [tuple(map(tuple, w)) for w in want]
                # The f = 0 runs have no attack: the same ones in every attack's panel.
                want_ref = [tuple(zip(*curves[f"ref-{rule}-{res}-seed{s}"])) for s in (0, 1)]
                assert [tuple(map(tuple, c)) for c in ref.curves] == [tuple(map(tuple, w)) for w in want_ref]


def test_selection_histogram_sums_seeds_and_marks_the_last_f(tmp_path, monkeypatch):
    sw = fig3_like(tmp_path)
    _, selections = fill(sw)
    seen = {}
    monkeypatch.setattr(plots, "selection_histogram",
                        lambda panels, rows, cols, path, title="": seen.setdefault(path.name, panels) and path)
    sweep.draw_plots(sw, sweep.collect(sw))
    panels = seen["selection-cm.png"]
    assert set(panels) == {(f"attack={a}", f"resampling={r}") for a in ("bitflip", "labelflip")
                           for r in ("none", "s_replacement")}
    for (a, r), sel in panels.items():
        a, r = a.split("=")[1], r.split("=")[1]
        runs = [selections[f"cm-{a}-{r}-seed{s}"] for s in (0, 1)]
        assert sel.counts == [sum(c[w] for c in runs) for w in range(6)]
        assert sel.byzantine == [5]                      # n = 6, f = 1: the last worker


def test_no_finished_run_draws_nothing_and_does_not_fail(tmp_path):
    sw = fig3_like(tmp_path)
    assert sweep.write_report(sw)["plots"] == []
    assert "Runs finished: 0/" in (sw.out / "results.md").read_text()


def test_heatmap_values_are_seed_means(tmp_path, monkeypatch):
    sw = fig3_like(tmp_path)
    curves, _ = fill(sw)
    seen = {}
    monkeypatch.setattr(plots, "heatmap", lambda mats, path, label="": seen.setdefault("m", mats) and path)
    sweep.draw_plots(sw, sweep.collect(sw))
    mats = seen["m"]
    assert [m.title for m in mats] == ["resampling.name = none", "resampling.name = s_replacement"]
    for m, res in zip(mats, ("none", "s_replacement")):
        assert m.rows == ["cm", "mean"] and m.columns == ["bitflip", "labelflip", "f=0"]
        for i, rule in enumerate(m.rows):
            for j, attack in enumerate(m.columns):
                ids = [f"ref-{rule}-{res}-seed{s}" if attack == "f=0" else f"{rule}-{attack}-{res}-seed{s}"
                       for s in (0, 1)]
                want = sum(100.0 * curves[i_][-1][1] for i_ in ids) / 2
                assert math.isclose(m.values[i, j], want, rel_tol=1e-12)


def test_a_rotating_byzantine_set_is_not_split_and_the_plot_says_so(tmp_path, monkeypatch):
    sw = fig3_like(tmp_path)
    _, selections = fill(sw)
    # The runs of one cell say their set rotated (attack.rotate): no fixed ids to mark.
    for s in (0, 1):
        path = sw.runs_dir / f"cm-bitflip-none-seed{s}" / "summary.json"
        summary = json.loads(path.read_text())
        path.write_text(json.dumps(summary | {"byzantine_policy": "rotating"}))
    seen = {}
    monkeypatch.setattr(plots, "selection_histogram",
                        lambda panels, rows, cols, path, title="": seen.setdefault(path.name, panels) and path)
    sweep.draw_plots(sw, sweep.collect(sw))
    panels = seen["selection-cm.png"]
    rotating = panels[("attack=bitflip", "resampling=none")]
    assert rotating.byzantine is None and not rotating.split
    assert rotating.counts == [sum(selections[f"cm-bitflip-none-seed{s}"][w] for s in (0, 1)) for w in range(6)]
    assert "rotates" in plots.selection_label(rotating)
    fixed = panels[("attack=labelflip", "resampling=none")]
    assert fixed.byzantine == [5] and "red: Byzantine" in plots.selection_label(fixed)
    monkeypatch.undo()          # the real histogram draws the unsplit panel
    assert_png(plots.selection_histogram({("", "x"): rotating}, [""], ["x"], tmp_path / "r.png"))
