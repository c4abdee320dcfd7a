"""Paired comparisons in sweeps: t quantiles, intervals, paired differences against a baseline,
which axes share the honest workers' draws, and the diagnostics tables and plot."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from byzddp import config, data, sweep
from byzddp.config import ConfigError
from byzddp.sweep import figures, paired, report
from byzddp.sweep.stats import mean_ci, t_cdf, t_quantile
from test_plots import assert_png
from test_sweep import fake_finished, grid_spec, write_grid

# ---------------------------------------------------------------------------- Student t

# Two-sided 95% and 99% critical values from standard printed tables (3 decimals).
TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 9: 2.262, 10: 2.228,
             20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}
TABLE_995 = {1: 63.657, 2: 9.925, 4: 4.604, 10: 3.169, 30: 2.750}


@pytest.mark.parametrize("df, value", sorted(TABLE_975.items()))
def test_t_quantile_0975_matches_the_printed_table(df, value):
    assert round(t_quantile(0.975, df), 3) == value


@pytest.mark.parametrize("df, value", sorted(TABLE_995.items()))
def test_t_quantile_0995_matches_the_printed_table(df, value):
    assert round(t_quantile(0.995, df), 3) == value


def _density(t: float, df: float) -> float:
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
        * (1 + t * t / df) ** (-(df + 1) / 2)


@pytest.mark.parametrize("df", [1, 2.5, 7, 40])
def test_t_cdf_is_the_integral_of_the_density(df):
    # Independent of the incomplete beta: Simpson's rule on the density from 0 to t.
    for t in (0.3, 1.0, 2.5):
        m = 2000
        h = t / m
        area = _density(0, df) + _density(t, df) + sum(
            (4 if k % 2 else 2) * _density(k * h, df) for k in range(1, m))
        assert t_cdf(t, df) == pytest.approx(0.5 + area * h / 3, abs=1e-10)
        assert t_cdf(-t, df) == pytest.approx(1 - t_cdf(t, df), abs=1e-14)


def test_t_quantile_inverts_the_cdf_and_tends_to_the_normal():
    for df in (1, 3, 12, 200):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-13)
            assert t_quantile(1 - p, df) == -t_quantile(p, df)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-6)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_mean_ci_is_mean_plus_minus_t_s_over_root_k():
    values = [0.81, 0.74, 0.9, 0.77, 0.86]
    mean, low, high = mean_ci(values)
    m = sum(values) / 5
    s = math.sqrt(sum((v - m) ** 2 for v in values) / 4)
    assert mean == pytest.approx(m)
    assert low == pytest.approx(m - 2.776 * s / math.sqrt(5), abs=1e-4)
    assert high == pytest.approx(m + 2.776 * s / math.sqrt(5), abs=1e-4)
    assert mean_ci([0.5]) == (0.5, None, None)


# ---------------------------------------------------------------------------- paired differences

def finish(sw, run, accuracy, **summary):
    """fake_finished, with more summary.json keys (diagnostics, attack success)."""
    run_dir = fake_finished(sw, run, accuracy)
    s = json.loads((run_dir / "summary.json").read_text())
    s.update(summary)
    (run_dir / "summary.json").write_text(json.dumps(s))
    return run_dir


def made_up(k: int) -> float:
    return round(0.4 + 0.5 * math.sin(1.3 * k + 0.2) ** 2, 6)


def paired_sweep(tmp_path, **extra):
    spec = grid_spec(seeds=[0, 1, 2], plots=[],
                     grid={"attack.name": ["none", "bitflip", "labelflip"],
                           "resampling.name": ["none", "s_replacement"]}, **extra)
    return sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "out")


def test_paired_csv_is_the_brute_force_difference_seed_by_seed(tmp_path):
    sw = paired_sweep(tmp_path)
    acc = {}
    for k, run in enumerate(sw.runs):
        if run.id == "cm-bitflip-s_replacement-seed1":      # one seed of one cell missing
            continue
        acc[run.id] = made_up(k)
        finish(sw, run, acc[run.id])
    report.write_report(sw)
    rows = list(csv.DictReader((sw.out / "paired.csv").open()))
    assert list(rows[0]) == list(paired.COLUMNS)
    values = {"rule": ["mean", "cm"], "attack.name": ["none", "bitflip", "labelflip"],
              "resampling.name": ["none", "s_replacement"]}
    expected = 0
    for axis, labels in values.items():
        others = [a for a in values if a != axis]
        for arm in labels[1:]:
            for a in values[others[0]]:
                for b in values[others[1]]:
                    cell = {axis: None, others[0]: a, others[1]: b}

                    def run_id(v, seed):
                        c = dict(cell, **{axis: v})
                        return f"{c['rule']}-{c['attack.name']}-{c['resampling.name']}-seed{seed}"

                    diffs = [acc[run_id(arm, s)] - acc[run_id(labels[0], s)] for s in (0, 1, 2)
                             if run_id(arm, s) in acc and run_id(labels[0], s) in acc]
                    label = f"{others[0]}={a}, {others[1]}={b}"
                    row = next(r for r in rows if r["metric"] == "final_test_accuracy_last5"
                               and r["axis"] == axis and r["arm"] == arm and r["cell"] == label)
                    expected += 1
                    assert row["baseline"] == labels[0]
                    k = len(diffs)
                    m = sum(diffs) / k
                    s = math.sqrt(sum((d - m) ** 2 for d in diffs) / (k - 1))
                    half = {2: 12.706, 3: 4.303}[k] * s / math.sqrt(k)
                    assert int(row["seeds"]) == k
                    assert float(row["mean_difference"]) == pytest.approx(m, abs=1e-12)
                    assert float(row["ci_low"]) == pytest.approx(m - half, abs=1e-3 * s + 1e-12)
                    assert float(row["ci_high"]) == pytest.approx(m + half, abs=1e-3 * s + 1e-12)
                    assert int(row["wins"]) == sum(d > 0 for d in diffs)
    assert expected == len(rows) == 6 + 2 * 4 + 6
    assert {r["seeds"] for r in rows if r["cell"] in ("rule=cm, attack.name=bitflip",
                                                      "attack.name=bitflip, resampling.name=s_replacement")
            and r["axis"] != "rule"} == {"2"}


def test_paired_differences_section_in_results_md(tmp_path):
    sw = paired_sweep(tmp_path)
    for k, run in enumerate(sw.runs):
        finish(sw, run, made_up(k))
    md = report.write_report(sw)["markdown"].read_text()
    rows = list(csv.DictReader((sw.out / "paired.csv").open()))
    section = md.split("## Paired differences")[1]
    block = section.split("### resampling.name: s_replacement - none")[1].split("### ")[0]
    lines = [[c.strip() for c in l.strip("|").split("|")] for l in block.splitlines() if l.startswith("| ")]
    assert lines[0] == ["rule, attack.name", "mean difference (points of %)", "95% CI", "seeds", "wins",
                        "honest draws"]
    for line in lines[1:]:
        rule, attack = line[0].split(", ")
        row = next(r for r in rows if r["axis"] == "resampling.name"
                   and r["cell"] == f"rule={rule}, attack.name={attack}")
        assert line[1] == f"{100 * float(row['mean_difference']):+.2f}"
        assert line[2] == f"[{100 * float(row['ci_low']):+.2f}, {100 * float(row['ci_high']):+.2f}]"
        assert line[3:] == ["3", f"{row['wins']}/3", "shared"]
    better = sum(float(r["mean_difference"]) > 0 for r in rows if r["axis"] == "resampling.name")
    assert f"s_replacement is better (higher final_test_accuracy_last5) than none on average in {better} of 6" in block


def test_lower_is_better_metrics_count_wins_the_other_way(tmp_path):
    sw = paired_sweep(tmp_path, table={"rows": "rule", "columns": "attack.name",
                                       "also": ["final_attack_success_rate"]})
    asr = {}
    for k, run in enumerate(sw.runs):
        asr[run.id] = made_up(k + 7)
        finish(sw, run, made_up(k), final_attack_success_rate=asr[run.id])
    report.write_report(sw)
    rows = [r for r in csv.DictReader((sw.out / "paired.csv").open())
            if r["metric"] == "final_attack_success_rate" and r["axis"] == "rule"]
    assert len(rows) == 6
    for row in rows:
        cell = dict(kv.split("=") for kv in row["cell"].split(", "))
        ids = [f"{{}}-{cell['attack.name']}-{cell['resampling.name']}-seed{s}" for s in (0, 1, 2)]
        diffs = [asr[i.format("cm")] - asr[i.format("mean")] for i in ids]
        assert int(row["wins"]) == sum(d < 0 for d in diffs)


def test_baseline_in_the_grid_file_picks_the_arm_compared_against(tmp_path):
    sw = paired_sweep(tmp_path, baseline={"resampling.name": "s_replacement", "rule": "cm"})
    assert sw.baseline == {"rule": "cm", "attack.name": "none", "resampling.name": "s_replacement"}
    for k, run in enumerate(sw.runs):
        finish(sw, run, made_up(k))
    report.write_report(sw)
    rows = list(csv.DictReader((sw.out / "paired.csv").open()))
    assert {(r["axis"], r["baseline"], r["arm"]) for r in rows} == {
        ("rule", "cm", "mean"), ("attack.name", "none", "bitflip"), ("attack.name", "none", "labelflip"),
        ("resampling.name", "s_replacement", "none")}
    one = next(r for r in rows if r["axis"] == "resampling.name"
               and r["cell"] == "rule=mean, attack.name=bitflip")
    accuracy = {r.id: json.loads((sw.runs_dir / r.id / "summary.json").read_text())["final_test_accuracy_last5"]
                for r in sw.runs}
    diffs = [accuracy[f"mean-bitflip-none-seed{s}"] - accuracy[f"mean-bitflip-s_replacement-seed{s}"]
             for s in (0, 1, 2)]
    assert float(one["mean_difference"]) == pytest.approx(sum(diffs) / 3, abs=1e-12)


def test_a_numeric_baseline_matches_its_grid_value(tmp_path):
    spec = grid_spec(grid={"workers.momentum": [0.0, 0.9]}, cases=None, seeds=[0],
                     baseline={"workers.momentum": 0.9})
    assert sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "o").baseline == {"workers.momentum": "0.9"}


@pytest.mark.parametrize("baseline, message", [
    ({"resampling": "none"}, "baseline.resampling: not an axis of this sweep; axes: rule, attack.name"),
    ({"resampling.name": "bucketing"}, "baseline.resampling.name: 'bucketing' is not one of the axis's "
                                       "values: none, s_replacement"),
    ("none", "baseline: expected a mapping"),
])
def test_a_bad_baseline_is_one_line_and_exit_2(tmp_path, capsys, baseline, message):
    grid = write_grid(tmp_path, grid_spec(baseline=baseline))
    with pytest.raises(ConfigError, match=message):
        sweep.load_grid(grid, out=tmp_path / "o")
    assert sweep.main([str(grid), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: grid file") and "baseline" in err[0]
    assert not (tmp_path / "o").exists()


def test_one_seed_gives_no_interval_and_says_so(tmp_path):
    spec = grid_spec(seeds=[4], plots=[], grid={"resampling.name": ["none", "s_replacement"]})
    sw = sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "out")
    for k, run in enumerate(sw.runs):
        finish(sw, run, made_up(k))
    md = report.write_report(sw)["markdown"].read_text()
    assert "one seed (4): single runs, no standard deviation and no confidence interval" in md
    assert "one seed, so no confidence interval" in md
    rows = list(csv.DictReader((sw.out / "paired.csv").open()))
    assert rows and all(r["ci_low"] == r["ci_high"] == "" and r["seeds"] == "1" for r in rows)
    table = md.split("### resampling.name: s_replacement - none")[1]
    assert "| mean | " in table and " | - | 1 | " in table
    assert " [" not in md.split("## Paired differences")[0]       # no interval in the cells


# ---------------------------------------------------------------------------- shared randomness

def synthetic_dataset(n: int = 240, classes: int = 4) -> data.Dataset:
    """Each training image's first pixel is its own index: a batch shows which examples it drew."""
    y = torch.arange(n) % classes
    x = torch.zeros(n, 1, 8, 8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return data.Dataset(x, y, x[:8].clone(), y[:8].clone(), classes)


def honest_batches(cfg, ds, steps=4):
    """Each honest worker's example indices per step, built as the trainer builds its data."""
    holders = paired.shard_holders(cfg)
    fixed = [w for w in range(cfg.workers.n) if w not in holders]
    wd = data.WorkerData(ds, cfg, fixed)
    from byzddp import attacks
    byzantine = set(attacks.byzantine_set(cfg, 0))
    return {w: [wd.batch_of(w, t)[0][:, 0, 0, 0].long().tolist() for t in range(steps)]
            for w in range(cfg.workers.n) if w not in byzantine}


BASE = ["workers.n=6", "workers.byzantine=1", "train.batch_size=4", "data.partition=sorted",
        "aggregator.name=cm", "resampling.name=none", "attack.name=bitflip", "seed=3"]

# (the other arm's overrides, whether the honest workers' draws are shared)
ARMS = [
    (["aggregator.name=mean"], True),                    # rule
    (["aggregator.name=rfa", "aggregator.T=3"], True),
    (["resampling.name=s_replacement", "resampling.s=2"], True),   # pre-aggregation
    (["resampling.name=bucketing", "resampling.s=2"], True),
    (["attack.name=labelflip"], True),                   # another attack of the same f
    (["attack.name=alie"], True),
    (["attack.name=none"], False),                       # no attacker: all 6 workers hold a shard
    (["attack.name=backdoor"], False),                   # it trains on a shard of its own
    (["attack.count=0"], False),                         # no real attacker either
    (["data.partition=two_groups"], False),              # mimic2's setting in fig3
    (["seed=4"], False),
]


@pytest.mark.parametrize("other, shared", ARMS)
def test_honest_draws_are_shared_exactly_where_the_batches_are(other, shared):
    ds = synthetic_dataset()
    a = config.load(None, BASE)
    b = config.load(None, BASE + other)
    batches_a, batches_b = honest_batches(a, ds), honest_batches(b, ds)
    common = sorted(set(batches_a) & set(batches_b))
    assert common == [0, 1, 2, 3, 4]
    same = all(batches_a[w] == batches_b[w] for w in common)
    assert same == shared
    assert (paired.honest_draws(a) == paired.honest_draws(b)) == shared


def test_without_an_attacker_attack_and_backdoor_share_the_shards():
    # Every worker holds a shard both without an attacker and under backdoor, and under a
    # rotating set whatever the attack: then the honest workers' draws match.
    ds = synthetic_dataset()
    for a_over, b_over in ((["attack.name=none"], ["attack.name=backdoor"]),
                           (["attack.rotate=true", "attack.name=none"], ["attack.rotate=true"])):
        a, b = config.load(None, BASE + a_over), config.load(None, BASE + b_over)
        assert paired.honest_draws(a) == paired.honest_draws(b)
        ba, bb = honest_batches(a, ds), honest_batches(b, ds)
        assert all(ba[w] == bb[w] for w in set(ba) & set(bb))


@pytest.mark.slow
def test_shard_holders_are_the_trainers(monkeypatch):
    """The trainer's own data: the workers it gives a shard are those shard_holders names."""
    from byzddp import distributed
    from byzddp.trainer import Trainer
    ds = synthetic_dataset()
    monkeypatch.setattr(data, "load", lambda cfg: ds)
    for over in ([], ["attack.name=none"], ["attack.name=backdoor"], ["attack.rotate=true"]):
        cfg = config.load(None, BASE + over + ["model.name=mlp", "model.hidden=[4]", "log.progress=false",
                                               "attack.trigger_size=2"])
        trainer = Trainer(cfg, distributed.setup(cfg))
        everything = len(ds.train_y)
        holders = [w for w in range(cfg.workers.n) if len(trainer.data.indices[w]) < everything]
        assert holders == paired.shard_holders(cfg)


def test_paired_rows_say_which_axes_share_the_honest_draws(tmp_path):
    spec = grid_spec(seeds=[0, 1], plots=[],
                     grid={"attack.name": ["none", "bitflip", "mimic2"],
                           "resampling.name": ["none", "s_replacement"]},
                     when=[{"if": {"attack.name": "mimic2"}, "set": {"data.partition": "two_groups"}}])
    sw = sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "out")
    for k, run in enumerate(sw.runs):
        finish(sw, run, made_up(k))
    md = report.write_report(sw)["markdown"].read_text()
    rows = list(csv.DictReader((sw.out / "paired.csv").open()))
    shared = {(r["axis"], r["arm"]): (r["shared_randomness"], r["differs_in"]) for r in rows}
    assert shared == {("rule", "cm"): ("yes", ""), ("resampling.name", "s_replacement"): ("yes", ""),
                      ("attack.name", "bitflip"): ("no", "shards"),
                      ("attack.name", "mimic2"): ("no", "data;shards")}
    assert "| differ: shards |" in md and "| differ: data, shards |" in md


# ---------------------------------------------------------------------------- diagnostics

DIAG = {"mean_kappa": 0.8, "mean_aggregation_error": 1.5, "mean_honest_variance": 2.0,
        "mean_update_cosine": 0.9, "mean_byzantine_selection_rate": 0.25, "mean_honest_selection_rate": 0.75}


def with_diagnostics(sw, run, accuracy, k):
    """A run that recorded the server's diagnostics: per evaluation in metrics.jsonl, means in summary.json."""
    run_dir = finish(sw, run, accuracy, **{m: v * (1 + 0.1 * k) for m, v in DIAG.items()})
    lines = [{"step": s, "test_accuracy": accuracy * s / 9, "kappa": 0.5 * (k + 1) * s,
              "byzantine_selection_rate": 0.1 * s, "honest_selection_rate": 1 - 0.05 * s}
             for s in (3, 6, 9)]
    lines.insert(1, {"step": 4, "kappa": None})                # a round without a value: skipped
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines) + '{"step": 1')
    return run_dir


def test_read_curve_reads_any_key_and_skips_lines_without_it(tmp_path):
    spec = grid_spec(seeds=[0], plots=[], cases=None, grid={"resampling.name": ["none"]})
    sw = sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "out")
    run_dir = with_diagnostics(sw, sw.runs[0], 0.9, 1)
    assert figures.read_curve(run_dir, "kappa") == ([3, 6, 9], [3.0, 6.0, 9.0])
    assert figures.read_curve(run_dir) == ([3, 6, 9], [pytest.approx(0.3), pytest.approx(0.6), pytest.approx(0.9)])
    assert figures.read_curve(run_dir, "update_cosine") == ([], [])


def test_diagnostics_tables_csv_columns_and_plot_where_recorded(tmp_path):
    spec = grid_spec(seeds=[0, 1], cases={"rule": {"cm": {"aggregator.name": "cm"}}},
                     grid={"attack.name": ["bitflip"], "resampling.name": ["none", "s_replacement"]},
                     plots=[{"kind": "curves", "columns": "attack.name", "hue": "resampling.name"}])
    sw = sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "out")
    kappa = {}
    for k, run in enumerate(sw.runs):
        with_diagnostics(sw, run, made_up(k), k)
        kappa[run.id] = DIAG["mean_kappa"] * (1 + 0.1 * k)
    out = report.write_report(sw)
    names = sorted(p.name for p in out["plots"])
    assert names == ["curves-cm.png", "diagnostics-cm.png"]     # one figure per rule (one here)
    assert_png(sw.out / "plots" / "diagnostics-cm.png")
    rows = list(csv.DictReader(out["csv"].open()))
    assert all(float(r["mean_kappa"]) == pytest.approx(kappa[r["run_id"]]) for r in rows)
    md = out["markdown"].read_text()
    block = md.split("\n## mean_kappa")[1].split("\n## ")[0]
    for res in ("none", "s_replacement"):
        values = [kappa[f"cm-bitflip-{res}-seed{s}"] for s in (0, 1)]
        m, lo, hi = mean_ci(values)
        sd = math.sqrt(sum((v - m) ** 2 for v in values))     # n - 1 = 1
        table = block.split(f"### resampling.name = {res}")[1].split("###")[0]
        assert f"| cm | {m:.4g} +- {sd:.4g} [{lo:.4g}, {hi:.4g}] |" in table
    # kappa is compared too (lower is better), in paired.csv.
    prs = [r for r in csv.DictReader((sw.out / "paired.csv").open()) if r["metric"] == "mean_kappa"]
    assert len(prs) == 1 and int(prs[0]["wins"]) == sum(
        kappa[f"cm-bitflip-s_replacement-seed{s}"] < kappa[f"cm-bitflip-none-seed{s}"] for s in (0, 1))


def test_no_diagnostics_recorded_no_diagnostics_plot_nor_tables(tmp_path):
    spec = grid_spec(seeds=[0], cases={"rule": {"cm": {"aggregator.name": "cm"}}},
                     grid={"resampling.name": ["none", "s_replacement"]},
                     plots=[{"kind": "diagnostics", "hue": "resampling.name"}])
    sw = sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "out")
    for k, run in enumerate(sw.runs):
        finish(sw, run, made_up(k))
    out = report.write_report(sw)
    assert out["plots"] == []
    md = out["markdown"].read_text()
    assert "mean_kappa" not in md and "## Paired differences" in md
    assert [r["mean_kappa"] for r in csv.DictReader(out["csv"].open())] == ["", ""]


# ---------------------------------------------------------------------------- a real sweep

@pytest.mark.slow
def test_a_real_sweep_pairs_its_runs_seed_by_seed(tmp_path, monkeypatch, capsys):
    """train.py for 2 seeds x {no resampling, resampling}: paired.csv is the per-seed difference
    of the runs' own summaries, and the pairs share the honest draws."""
    spec = {"name": "real-paired",
            "set": {"train.steps": 4, "train.eval_every": 2, "workers.n": 5, "workers.byzantine": 1,
                    "aggregator.name": "cm", "attack.name": "bitflip", "resampling.s": 2,
                    "data.partition": "sorted", "model.hidden": [8], "data.test_size": 200,
                    "train.batch_size": 8},
            "grid": {"resampling.name": ["none", "s_replacement"]},
            "seeds": [0, 1], "plots": []}
    grid = write_grid(tmp_path, spec)
    out = tmp_path / "out"
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    assert sweep.main([str(grid), "--out", str(out), "--jobs", "2"]) == 0, capsys.readouterr().err[-3000:]
    summaries = {p.name: json.loads((p / "summary.json").read_text()) for p in (out / "runs").iterdir()}
    rows = list(csv.DictReader((out / "paired.csv").open()))
    main = [r for r in rows if r["metric"] == "final_test_accuracy_last5"]
    assert len(main) == 1 and main[0]["arm"] == "s_replacement" and main[0]["shared_randomness"] == "yes"
    diffs = [summaries[f"s_replacement-seed{s}"]["final_test_accuracy_last5"]
             - summaries[f"none-seed{s}"]["final_test_accuracy_last5"] for s in (0, 1)]
    m, low, high = mean_ci(diffs)
    assert float(main[0]["mean_difference"]) == pytest.approx(m, abs=1e-12)
    assert (float(main[0]["ci_low"]), float(main[0]["ci_high"])) == pytest.approx((low, high), abs=1e-12)
    assert "## Paired differences" in (out / "results.md").read_text()
    if "mean_kappa" in summaries["none-seed0"]:     # the server records its diagnostics
        assert any(r["metric"] == "mean_kappa" for r in rows)
        assert "## mean_kappa" in (out / "results.md").read_text()
