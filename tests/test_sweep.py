"""Sweeps: grid expansion, resume, the runner, results.csv / results.md, and one real sweep."""
import csv
import itertools
import json
import math
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from byzddp import aggregators, attacks, config, sweep
from byzddp.sweep import runner
from byzddp.config import ConfigError
from helpers import train

ROOT = Path(__file__).resolve().parent.parent

# Small settings every rule and attack used here accepts; the real trainer is never run
# except in the end-to-end test at the bottom.
TINY_SET = {"workers.n": 6, "workers.byzantine": 1, "train.steps": 3, "train.eval_every": 3,
            "data.partition": "sorted"}


def write_grid(folder: Path, spec: dict, name: str = "grid.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def grid_spec(**extra) -> dict:
    spec = {
        "name": "t",
        "set": dict(TINY_SET),
        "cases": {"rule": {"mean": {"aggregator.name": "mean"},
                           "cm": {"aggregator.name": "cm"}}},
        "grid": {"attack.name": ["bitflip", "labelflip"],
                 "resampling.name": ["none", "s_replacement"]},
        "seeds": [0, 1],
    }
    spec.update(extra)
    return spec


def fake_finished(sw: sweep.Sweep, run: sweep.Run, accuracy: float, config_hash=None,
                  curve=None, selection=None, byzantine_real=None) -> Path:
    """A run folder as train.py leaves it: config.yaml, metrics.jsonl, summary.json."""
    run_dir = sw.runs_dir / run.id
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = config.load(sw.base, run.override_args())
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(cfg)))
    curve = curve if curve is not None else [(3, accuracy)]
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "test_accuracy": a, "test_loss": 1.0, "train_loss": 1.0,
                    "wall_seconds": 0.1}) + "\n" for s, a in curve))
    summary = {"final_test_accuracy": accuracy, "final_test_accuracy_last5": accuracy,
               "best_test_accuracy": accuracy, "steps": 3, "wall_seconds": 0.5,
               "model_sha256": "0" * 64, "selection_counts": selection,
               "config_hash": config_hash or config.config_hash(cfg), "attack": cfg.attack.name,
               "byzantine_declared": cfg.workers.byzantine,
               "byzantine_real": cfg.workers.byzantine if byzantine_real is None else byzantine_real}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def fake_started(sw: sweep.Sweep, run: sweep.Run, extra: list) -> str:
    """A run folder of a run that started (config.yaml) and stopped; returns its hash."""
    run_dir = sw.runs_dir / run.id
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = config.load(sw.base, run.override_args() + extra)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(cfg)))
    return config.config_hash(cfg)


# ---------------------------------------------------------------------------- expansion

def test_expansion_is_the_cartesian_product_of_cases_grid_and_seeds(tmp_path):
    sw = sweep.load_grid(write_grid(tmp_path, grid_spec()), out=tmp_path / "out")
    expected = [(rule, attack, res, seed) for seed in (0, 1) for rule in ("mean", "cm")
                for attack in ("bitflip", "labelflip") for res in ("none", "s_replacement")]
    assert len(sw.runs) == len(expected) == 16
    got = [(r.point["rule"], r.point["attack.name"], r.point["resampling.name"], r.seed) for r in sw.runs]
    assert got == expected
    for run, (rule, attack, res, seed) in zip(sw.runs, expected):
        assert run.id == f"{rule}-{attack}-{res}-seed{seed}"
        cfg = config.load(sw.base, run.override_args())
        assert (cfg.aggregator.name, cfg.attack.name, cfg.resampling.name, cfg.seed) == \
            (rule, attack, res, seed)
        assert (cfg.workers.n, cfg.workers.byzantine, cfg.train.steps) == (6, 1, 3)
        assert run.hash == config.config_hash(cfg)
    assert len({r.hash for r in sw.runs}) == 16


def test_ids_and_hashes_are_stable_across_expansions(tmp_path):
    path = write_grid(tmp_path, grid_spec())
    a = sweep.load_grid(path, out=tmp_path / "o")
    b = sweep.load_grid(path, out=tmp_path / "o")
    assert [(r.id, r.hash) for r in a.runs] == [(r.id, r.hash) for r in b.runs]


def test_numeric_grid_values_are_named_after_their_key(tmp_path):
    spec = grid_spec(grid={"workers.momentum": [0.0, 0.9]}, cases=None, seeds=[3])
    sw = sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "o")
    assert [r.id for r in sw.runs] == ["momentum0.0-seed3", "momentum0.9-seed3"]
    assert [config.load(sw.base, r.override_args()).workers.momentum for r in sw.runs] == [0.0, 0.9]


def test_when_rules_exclude_and_reference(tmp_path):
    spec = grid_spec(
        when=[{"if": {"attack.name": "labelflip"}, "set": {"data.partition": "iid"}},
              {"if": {"rule": "cm", "resampling.name": ["s_replacement"]},
               "set": {"train.lr": 0.05}}],
        exclude=[{"rule": "mean", "resampling.name": "s_replacement"}],
        reference={"label": "f=0", "set": {"attack.name": "none", "workers.n": 5,
                                           "workers.byzantine": 0}})
    sw = sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "o")
    main = [r for r in sw.runs if r.role == "main"]
    refs = [r for r in sw.runs if r.role == "reference"]
    # Brute force: the product minus the excluded points.
    points = [p for p in itertools.product([0, 1], ["mean", "cm"], ["bitflip", "labelflip"],
                                           ["none", "s_replacement"])
              if not (p[1] == "mean" and p[3] == "s_replacement")]
    assert len(main) == len(points) == 12
    for run in main:
        cfg = config.load(sw.base, run.override_args())
        assert cfg.data.partition == ("iid" if cfg.attack.name == "labelflip" else "sorted")
        assert cfg.train.lr == (0.05 if (cfg.aggregator.name == "cm" and
                                         cfg.resampling.name == "s_replacement") else 0.01)
    # The reference sets attack.name, so the attack axis is dropped: one run per
    # (rule, resampling, seed) among the points that remain.
    assert sw.dropped == ["attack.name"]
    want = sorted({(p[1], p[3], p[0]) for p in points})
    assert sorted((r.point["rule"], r.point["resampling.name"], r.seed) for r in refs) == want
    for r in refs:
        assert "attack.name" not in r.point and r.id.startswith("ref-")
        cfg = config.load(sw.base, r.override_args())
        assert (cfg.attack.name, cfg.workers.n, cfg.workers.byzantine) == ("none", 5, 0)
        assert cfg.data.partition == "sorted"       # the labelflip rule does not fire for "none"
    assert "ref-cm-s_replacement-seed1" in {r.id for r in refs}


def test_command_line_overrides_apply_last_and_rename_the_sweep(tmp_path):
    path = write_grid(tmp_path, grid_spec())
    sw = sweep.load_grid(path, ["train.steps=4", "data.partition=iid"])
    assert sw.name == "t-steps4-iid"
    assert sw.out == Path("runs") / "sweeps" / "t-steps4-iid"
    for run in sw.runs:
        cfg = config.load(sw.base, run.override_args())
        assert (cfg.train.steps, cfg.data.partition) == (4, "iid")
    assert sweep.load_grid(path, ["train.steps=4"], name="mine").name == "mine"
    with pytest.raises(ConfigError, match="attack.name.*sweeps"):
        sweep.load_grid(path, ["attack.name=none"])


def test_long_ids_are_cut_to_a_stable_head_and_digest(tmp_path):
    long = "x" * 130
    spec = grid_spec(cases={"rule": {long: {"aggregator.name": "cm"}, "cm": {"aggregator.name": "cm"}}},
                     grid=None, seeds=[0])
    path = write_grid(tmp_path, spec)
    ids = [r.id for r in sweep.load_grid(path, out=tmp_path / "o").runs]
    assert ids[1] == "cm-seed0"
    assert len(ids[0]) == 109 and ids[0].startswith("x" * 100 + "-")
    assert ids == [r.id for r in sweep.load_grid(path, out=tmp_path / "o").runs]


@pytest.mark.parametrize("patch, message", [
    ({"grdi": {}}, "grdi: unknown key"),
    ({"grid": {"attack.name": "bitflip"}}, "grid.attack.name: expected a non-empty list"),
    ({"grid": {"attack.name": ["bitflip", "bitflip"]}}, "values repeat"),
    ({"seeds": ["a"]}, "seeds: expected a non-empty list of integers"),
    ({"table": {"rows": "rulez"}}, "table.rows: 'rulez' is not an axis"),
    ({"plots": [{"kind": "pie"}]}, "plots\\[0\\].kind: 'pie'"),
    ({"when": [{"if": {"rule": "cm"}}]}, "when\\[0\\]: write each rule"),
    ({"exclude": [{"rule": ["mean", "cm"]}]}, "every point is excluded"),
    ({"base": "nowhere/x.yaml"}, "base: 'nowhere/x.yaml' not found"),
])
def test_bad_grid_files_name_the_key(tmp_path, patch, message):
    with pytest.raises(ConfigError, match=message):
        sweep.load_grid(write_grid(tmp_path, grid_spec(**patch)), out=tmp_path / "o")


def test_a_bad_point_fails_before_anything_runs_naming_the_run(tmp_path):
    spec = grid_spec(grid={"workers.byzantine": [1, 3]})   # f = 3 of n = 6 is not f < n/2
    with pytest.raises(ConfigError, match=r"run mean-byzantine3-seed0: config key workers.byzantine"):
        sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "o")


def test_paper_configs_expand_and_every_run_validates():
    counts = {}
    for path in sorted((ROOT / "configs" / "paper").glob("*.yaml")) + [ROOT / "configs/sweeps/smoke.yaml"]:
        sw = sweep.load_grid(path)            # loads and validates every run's config
        assert sw.name == path.stem
        counts[path.stem] = len(sw.runs)
        for run in sw.runs:
            assert run.overrides.get("data.dataset", "mnist5k") == "mnist5k"
    assert set(counts) == {"fig1a", "fig1b", "fig1c", "fig2a", "fig2b", "fig2c", "fig3", "fig5",
                           "bucketing", "official_mnist5k", "smoke", "leaderboard", "federated"}
    # federated: 7 rules x {none, backdoor} x {K = 1, 5} x 3 seeds.
    assert counts["federated"] == 7 * 2 * 2 * 3
    # official_mnist5k: 12 (rule, attack) cells x bucketing s in {0, 2} x 3 seeds.
    assert counts["official_mnist5k"] == 12 * 2 * 3
    # fig3: 4 rules x 6 attacks x 2 resampling x 3 seeds, plus the f = 0 runs (4 x 2 x 3).
    assert counts["fig3"] == 4 * 6 * 2 * 3 + 4 * 2 * 3
    assert counts["bucketing"] == 4 * 2 * 2 * 5 * 3
    # leaderboard: every rule x 19 attacks x 4 pre-aggregations, less bulyan and monna on
    # bucketing (they cannot run there), one seed.
    assert counts["leaderboard"] == len(aggregators.RULES) * 19 * 4 - 2 * 19


def test_the_leaderboard_holds_every_rule_and_every_attack_but_the_non_finite_ones():
    sw = sweep.load_grid(ROOT / "configs/paper/leaderboard.yaml")
    resolved = [tuple(r.overrides[k] for k in ("aggregator.name", "attack.name", "resampling.name")) for r in sw.runs]
    assert {rule for rule, _, _ in resolved} == set(aggregators.RULES)
    assert {attack for _, attack, _ in resolved} == set(attacks.ATTACKS) - {"nan", "inf"}
    assert {pre for _, _, pre in resolved} == {"none", "bucketing", "nnm", "arc"}
    assert len(set(resolved)) == len(resolved)


def test_rules_run_outside_their_guarantee_on_purpose_are_noted_once_per_run():
    sw = sweep.load_grid(ROOT / "configs/paper/fig3.yaml")
    allowed = {r.id for r in sw.runs if r.overrides.get("aggregator.allow_unsafe")}
    assert allowed == {r.id for r in sw.runs if r.point["rule"] == "krum"
                       and r.point["resampling.name"] == "s_replacement"}
    # Outside the guarantee: Krum after resampling with n = 10, f = 2, s = 2 (2*4+3 > 10);
    # its f = 0 references (n = 8) are inside it.
    noted = {n.split(":")[0][len("run "):] for n in sw.notes}
    assert noted == {i for i in allowed if not i.startswith("ref-")} and len(noted) == 6 * 3


def test_paper_configs_switch_to_full_mnist_with_one_key():
    sw = sweep.load_grid(ROOT / "configs/paper/fig3.yaml", ["data.dataset=mnist"])
    assert sw.name == "fig3-mnist"
    cfg = config.load(sw.base, sw.runs[0].override_args())
    assert cfg.data.dataset == "mnist" and cfg.model.name == "mlp" and cfg.train.steps == 600


# ---------------------------------------------------------------------------- runner

FAKE_TRAIN = textwrap.dedent("""
    # Stands in for train.py (and starts in milliseconds: no torch): reads log.dir and
    # log.name from its arguments, writes the run folder with the hash the test expects
    # for that run, and records the call. FAIL_RUN names a run that exits 1 instead.
    import json, os, sys, time
    opts = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    name, folder = opts["log.name"], opts["log.dir"]
    with open({calls!r}, "a") as fh:
        fh.write(json.dumps({{"name": name, "start": time.time(),
                              "omp": os.environ.get("OMP_NUM_THREADS"), "args": sys.argv[1:]}}) + "\\n")
    if name == os.environ.get("FAIL_RUN"):
        print("boom: this run fails on purpose")
        sys.exit(1)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    with open({hashes!r}) as fh:
        expected = json.load(fh)[name]
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    with open(os.path.join(folder, name, "metrics.jsonl"), "w") as fh:
        fh.write(json.dumps({{"step": 3, "test_accuracy": 0.5, "test_loss": 1.0,
                              "train_loss": 1.0, "wall_seconds": 0.1}}) + "\\n")
    with open(os.path.join(folder, name, "summary.json"), "w") as fh:
        json.dump({{"final_test_accuracy": 0.5, "final_test_accuracy_last5": 0.5,
                    "config_hash": expected, "selection_counts": None}}, fh)
    with open({calls!r}, "a") as fh:
        fh.write(json.dumps({{"name": name, "end": time.time()}}) + "\\n")
""")


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    """(command, started(), calls file, expect(sweep)): expect() tells the fake each run's
    config hash, which the test computes independently with config.load."""
    calls, hashes = tmp_path / "calls.jsonl", tmp_path / "hashes.json"
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN.format(calls=str(calls), hashes=str(hashes)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("FAIL_RUN", raising=False)

    def started():
        if not calls.exists():
            return []
        return [json.loads(l) for l in calls.read_text().splitlines() if "start" in json.loads(l)]

    def expect(sw):
        hashes.write_text(json.dumps({r.id: config.config_hash(config.load(sw.base, r.override_args()))
                                      for r in sw.runs}))

    return [sys.executable, str(script)], started, calls, expect


def small_sweep(tmp_path, **extra) -> sweep.Sweep:
    spec = grid_spec(grid={"attack.name": ["bitflip", "labelflip"]}, seeds=[0], **extra)
    return sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "out")


def test_resume_skips_finished_runs_and_reruns_mismatched_ones(tmp_path, fake_train):
    command, started, _, expect = fake_train
    sw = small_sweep(tmp_path)
    expect(sw)
    ids = [r.id for r in sw.runs]
    assert ids == ["mean-bitflip-seed0", "mean-labelflip-seed0", "cm-bitflip-seed0", "cm-labelflip-seed0"]
    fake_finished(sw, sw.runs[0], 0.9)                               # finished: skip
    fake_finished(sw, sw.runs[1], 0.9, config_hash="0123456789")    # another config: rerun
    fake_started(sw, sw.runs[2], [])                                 # started, same config
    other = fake_started(sw, sw.runs[3], ["train.lr=0.5"])           # started, another config
    assert [sweep.status(sw, r) for r in sw.runs] == ["done", "stale", "pending", "stale"]

    failed = sweep.run_sweep(sw, jobs=2, command=command, progress=False)
    assert failed == []
    assert sorted(c["name"] for c in started()) == sorted(ids[1:])
    assert all(sweep.status(sw, r) == "done" for r in sw.runs)
    # The started run of the same config was continued in its folder (train.resume=auto) ...
    assert (sw.runs_dir / ids[2] / "config.yaml").is_file()
    assert all("train.resume=auto" in c["args"] for c in started())
    # ... the folders of other configs were moved aside, not mixed with the new runs.
    stale = sorted(p.name for p in (sw.out / "stale").iterdir())
    assert stale == sorted(["mean-labelflip-seed0-0123456789", f"cm-labelflip-seed0-{other}"])
    moved = sw.out / "stale" / "mean-labelflip-seed0-0123456789" / "summary.json"
    assert json.loads(moved.read_text())["config_hash"] == "0123456789"
    # Everything finished: a second pass runs nothing.
    before = len(started())
    assert sweep.run_sweep(sw, jobs=2, command=command, progress=False) == []
    assert len(started()) == before


def test_runs_get_one_thread_each_and_the_sweep_arguments(tmp_path, fake_train):
    command, started, _, expect = fake_train
    sw = small_sweep(tmp_path)
    expect(sw)
    assert sweep.run_sweep(sw, jobs=1, command=command, progress=False) == []
    calls = {c["name"]: c for c in started()}
    assert set(calls) == {r.id for r in sw.runs}
    for run in sw.runs:
        args = calls[run.id]["args"]
        assert calls[run.id]["omp"] == "1"
        assert args == sweep.train_args(sw, run)
        assert f"log.name={run.id}" in args and "log.wandb_group=t" in args
        assert f"log.dir={sw.runs_dir.resolve()}" in args
        tags = yaml.safe_load(next(a for a in args if a.startswith("log.tags="))[len("log.tags="):])
        assert tags == [f"rule={run.point['rule']}", f"attack.name={run.point['attack.name']}", "seed=0"]


def test_parallel_jobs_overlap(tmp_path, fake_train, monkeypatch):
    command, _, calls, expect = fake_train
    monkeypatch.setenv("FAKE_SLEEP", "1.0")
    spec = grid_spec(grid={"attack.name": ["bitflip"]}, seeds=[0])
    sw = sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "out")
    expect(sw)
    assert len(sw.runs) == 2
    assert sweep.run_sweep(sw, jobs=2, command=command, progress=False) == []
    events = [json.loads(l) for l in calls.read_text().splitlines()]
    start = {e["name"]: e["start"] for e in events if "start" in e}
    end = {e["name"]: e["end"] for e in events if "end" in e}
    a, b = sorted(start)
    assert start[a] < end[b] and start[b] < end[a]       # the two intervals overlap


def test_a_failed_run_is_reported_and_does_not_stop_the_others(tmp_path, fake_train, monkeypatch, capsys):
    command, started, _, expect = fake_train
    sw = small_sweep(tmp_path)
    expect(sw)
    monkeypatch.setenv("FAIL_RUN", "mean-labelflip-seed0")
    failed = sweep.run_sweep(sw, jobs=1, command=command)
    assert failed == ["mean-labelflip-seed0"]
    assert len(started()) == 4
    assert [sweep.status(sw, r) for r in sw.runs] == ["done", "pending", "done", "done"]
    log = (sw.out / "logs" / "mean-labelflip-seed0.log").read_text()
    assert "boom: this run fails on purpose" in log
    # Not a terminal: one line per run with the overall progress.
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("[1/4, 0 failed, ETA ") and "] done mean-bitflip-seed0: " in lines[0]
    assert lines[1].startswith("[2/4, 1 failed, ETA ") and "] FAILED mean-labelflip-seed0: exit status 1" in lines[1]
    assert lines[3].startswith("[4/4, 1 failed, ETA -] done cm-labelflip-seed0")
    records = sweep.collect(sw)
    assert [r.status for r in records] == ["done", "unfinished", "done", "done"]


def test_main_exits_nonzero_when_a_run_failed(tmp_path, fake_train, monkeypatch):
    command, _, _, expect = fake_train
    monkeypatch.setattr(runner, "train_command", lambda nproc=None: command)
    monkeypatch.setenv("FAIL_RUN", "cm-bitflip-seed0")
    grid = write_grid(tmp_path, grid_spec(grid={"attack.name": ["bitflip"]}, seeds=[0]))
    expect(sweep.load_grid(grid))
    assert sweep.main([str(grid), "--out", str(tmp_path / "out"), "--jobs", "2"]) == 1
    assert (tmp_path / "out" / "results.md").is_file()
    monkeypatch.delenv("FAIL_RUN")
    assert sweep.main([str(grid), "--out", str(tmp_path / "out")]) == 0


def test_nproc_runs_each_run_under_torchrun(tmp_path, fake_train, monkeypatch):
    command = sweep.train_command(2)
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2"]
    assert command[5:] == [str(ROOT / "train.py")]
    assert sweep.train_command() == [sys.executable, str(ROOT / "train.py")]
    fake, started, _, expect = fake_train
    asked = []
    monkeypatch.setattr(runner, "train_command", lambda nproc=None: asked.append(nproc) or fake)
    grid = write_grid(tmp_path, grid_spec(grid={"attack.name": ["bitflip"]}, seeds=[0]))
    expect(sweep.load_grid(grid))
    assert sweep.main([str(grid), "--out", str(tmp_path / "out"), "--nproc", "2"]) == 0
    assert asked == [2] and len(started()) == 2


def test_bad_grid_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    grid = write_grid(tmp_path, grid_spec(grdi={}))
    assert sweep.main([str(grid), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: grid file") and "grdi" in err[0]


def test_list_only_writes_the_unfinished_runs_as_train_arguments(tmp_path, capsys):
    sw = small_sweep(tmp_path)
    grid = sw.path
    fake_finished(sw, sw.runs[2], 0.7)
    assert sweep.main([str(grid), "--out", str(sw.out), "--slurm", "--jobs", "3"]) == 0
    lines = (sw.out / "runs.txt").read_text().splitlines()
    pending = [r for r in sw.runs if r.id != sw.runs[2].id]
    assert len(lines) == 3
    for line, run in zip(lines, pending):
        args = shlex.split(line)
        assert args[0] == "--config"
        cfg = config.load(args[1], args[2:])
        assert cfg.log.name == run.id
        assert config.config_hash(cfg) == run.hash
    out = capsys.readouterr().out
    assert f"sbatch --array=0-2%3 slurm/array.sbatch {(sw.out / 'runs.txt').resolve()}" in out
    assert not (sw.runs_dir / sw.runs[0].id).exists()     # nothing ran


# ---------------------------------------------------------------------------- results

def test_results_csv_and_markdown_from_run_folders(tmp_path):
    spec = grid_spec(seeds=[0, 1, 2],
                     reference={"label": "f=0", "set": {"attack.name": "none", "workers.n": 5,
                                                        "workers.byzantine": 0}},
                     table={"rows": "rule", "columns": "attack.name", "split": "resampling.name"})
    sw = sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "out")
    # Made-up accuracies; one seed of one cell never finishes.
    acc = {}
    for k, run in enumerate(sw.runs):
        if run.id == "cm-labelflip-none-seed2":
            continue
        acc[run.id] = round(0.5 + 0.37 * math.sin(1.7 * k + 0.3) ** 2, 6)
        fake_finished(sw, run, acc[run.id])
    report = sweep.write_report(sw)

    rows = list(csv.DictReader(report["csv"].open()))
    assert [r["run_id"] for r in rows] == [r.id for r in sw.runs]
    for row, run in zip(rows, sw.runs):
        assert row["role"] == run.role and row["seed"] == str(run.seed)
        assert row["rule"] == run.point["rule"]
        assert row["attack.name"] == run.point.get("attack.name", "")
        if run.id in acc:
            assert row["status"] == "done"
            assert float(row["final_test_accuracy_last5"]) == acc[run.id]
            assert row["config_hash"] == run.hash
        else:
            assert row["status"] == "pending" and row["final_test_accuracy_last5"] == ""

    def brute(values):
        # mean +- sample std [95% CI: mean -+ t s / sqrt(k), t from the printed table]
        values = [100.0 * v for v in values]
        k = len(values)
        m = sum(values) / k
        s = math.sqrt(sum((v - m) ** 2 for v in values) / (k - 1))
        half = {2: 12.706205, 3: 4.302653}[k] * s / math.sqrt(k)
        return f"{m:.2f} +- {s:.2f} [{m - half:.2f}, {m + half:.2f}]"

    md = report["markdown"].read_text().split("## Paired differences")[0]   # tested in test_paired.py
    tables = {}
    current = None
    for line in md.splitlines():
        if line.startswith("## "):
            current = line[3:]
        elif line.startswith("| ") and current:
            tables.setdefault(current, []).append([c.strip() for c in line.strip("|").split("|")])
    assert set(tables) == {"resampling.name = none", "resampling.name = s_replacement"}
    for res in ("none", "s_replacement"):
        table = tables[f"resampling.name = {res}"]
        # Both columns are attacks: a worst-case column after the f = 0 one.
        assert table[0] == ["rule", "bitflip", "labelflip", "f=0", "worst case"]
        for line in table[1:]:
            rule = line[0]
            for attack, cell in zip(["bitflip", "labelflip"], line[1:3]):
                values = [acc[f"{rule}-{attack}-{res}-seed{s}"] for s in range(3)
                          if f"{rule}-{attack}-{res}-seed{s}" in acc]
                text = brute(values) + ("" if len(values) == 3 else f" ({len(values)}/3)")
                assert cell == text
            assert line[3] == brute([acc[f"ref-{rule}-{res}-seed{s}"] for s in range(3)])
        assert [line[0] for line in table[1:]] == ["mean", "cm"]
    assert "(2/3)" in md


def test_report_only_rebuilds_from_the_folder(tmp_path):
    sw = small_sweep(tmp_path)
    for run in sw.runs:
        fake_finished(sw, run, 0.25)
    assert sweep.main([str(sw.path), "--out", str(sw.out), "--report-only"]) == 0
    assert "25.00" in (sw.out / "results.md").read_text()
    assert (sw.out / "results.csv").read_text().count("\n") == 1 + len(sw.runs)


# ---------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_end_to_end_two_tiny_runs_through_train_py(tmp_path, monkeypatch, capsys):
    """The real train.py, two runs side by side, then the report."""
    spec = {"name": "e2e",
            "set": {"train.steps": 3, "train.eval_every": 3, "workers.n": 4, "workers.byzantine": 0,
                    "aggregator.name": "mean", "resampling.name": "none", "attack.name": "none",
                    "log.progress": False, "model.hidden": [16], "data.test_size": 200},
            "grid": {"data.partition": ["iid", "sorted"]},
            "seeds": [0]}
    grid = write_grid(tmp_path, spec)
    out = tmp_path / "out"
    monkeypatch.chdir(ROOT)
    assert sweep.main([str(grid), "--out", str(out), "--jobs", "2"]) == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()
    sw = sweep.load_grid(grid, out=out)
    assert [r.id for r in sw.runs] == ["iid-seed0", "sorted-seed0"]
    for run in sw.runs:
        summary = json.loads((out / "runs" / run.id / "summary.json").read_text())
        assert summary["config_hash"] == run.hash and summary["steps"] == 3
        assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["done", "done"]
    assert (out / "plots" / "curves.png").is_file()
    # The runs were forked from the sweep's fork server: the same model as `python train.py`.
    for run in sw.runs:
        argv = shlex.split((out / "logs" / f"{run.id}.log").read_text().splitlines()[0][2:])
        assert argv[:2] == [sys.executable, str(ROOT / "train.py")]
        alone = [a if not a.startswith("log.dir=") else f"log.dir={tmp_path / 'alone'}" for a in argv[2:]]
        train(alone)
        by_hand = json.loads((tmp_path / "alone" / run.id / "summary.json").read_text())
        forked = json.loads((out / "runs" / run.id / "summary.json").read_text())
        assert by_hand["model_sha256"] == forked["model_sha256"]
    # Resume: the same command again starts nothing.
    assert sweep.main([str(grid), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 runs (2 finished)" in err and "] done " not in err


def test_ctrl_c_stops_forked_runs_and_they_resume(tmp_path, monkeypatch):
    """Forked runs (the default for plain runs) stop on Ctrl-C as subprocesses do: SIGTERM to
    their session, a checkpoint, no summary; the folder is the run's, to resume from."""
    import os
    import signal
    import threading
    import time
    spec = {"name": "stop", "set": {"train.steps": 100000, "train.eval_every": 1000, "workers.n": 4,
                                    "workers.byzantine": 0, "aggregator.name": "mean",
                                    "resampling.name": "none", "attack.name": "none",
                                    "model.hidden": [8], "data.test_size": 100,
                                    "train.checkpoint_every": 0},
            "seeds": [0, 1, 2]}
    sw = sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "out")
    monkeypatch.chdir(ROOT)

    def interrupt_once_running():
        logs = tmp_path / "out" / "logs"
        for _ in range(600):     # the first runs are training (their logs say where they are)
            if len([p for p in logs.glob("*.log") if "byzddp:" in p.read_text()]) == 2:
                break
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_running, daemon=True).start()
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(sw, jobs=2, progress=False)
    assert time.monotonic() - began < 90
    logs = sorted(p.name for p in (tmp_path / "out" / "logs").glob("*.log"))
    assert logs == ["seed0.log", "seed1.log"]             # the third never started
    for run in sw.runs[:2]:
        assert "resume with train.resume=auto" in (tmp_path / "out" / "logs" / f"{run.id}.log").read_text()
    assert [sweep.status(sw, r) for r in sw.runs] == ["pending"] * 3


# ---------------------------------------------------------------------------- worst case, -m

def test_worst_case_column_is_the_brute_force_min_over_attacks(tmp_path):
    spec = grid_spec(grid={"attack.name": ["none", "bitflip", "labelflip", "alie"],
                           "resampling.name": ["none", "s_replacement"]},
                     table={"rows": "rule", "columns": "attack.name", "split": "resampling.name"})
    sw = sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "out")
    acc = {}
    for k, run in enumerate(sw.runs):
        if run.id == "cm-alie-none-seed1":     # a cell with one seed of two
            continue
        acc[run.id] = round(0.3 + 0.6 * math.sin(2.3 * k + 0.7) ** 2, 6)
        fake_finished(sw, run, acc[run.id])
    # No attack at all beats every attack here: "none" must not count as one.
    for rule in ("mean", "cm"):
        for res in ("none", "s_replacement"):
            for s_ in (0, 1):
                acc[f"{rule}-none-{res}-seed{s_}"] = 0.01
                fake_finished(sw, next(r for r in sw.runs if r.id == f"{rule}-none-{res}-seed{s_}"), 0.01)
    md = sweep.write_report(sw)["markdown"].read_text()
    for res in ("none", "s_replacement"):
        block = md.split(f"## resampling.name = {res}")[1].split("## ")[0]
        lines = [[c.strip() for c in l.strip("|").split("|")] for l in block.splitlines() if l.startswith("| ")]
        assert lines[0][-1] == "worst case"
        for line in lines[1:]:
            rule = line[0]
            means = {}
            for attack in ("bitflip", "labelflip", "alie"):
                got = [100.0 * acc[i] for i in (f"{rule}-{attack}-{res}-seed{s_}" for s_ in (0, 1)) if i in acc]
                means[attack] = sum(got) / len(got)
            attack = min(means, key=means.get)
            assert line[-1] == f"{means[attack]:.2f} ({attack})"


def test_no_worst_case_column_without_an_attack_axis(tmp_path):
    spec = grid_spec(grid={"resampling.name": ["none", "s_replacement"]}, seeds=[0])
    sw = sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "out")
    for run in sw.runs:
        fake_finished(sw, run, 0.5)
    md = sweep.write_report(sw)["markdown"].read_text()
    header = next(l for l in md.splitlines() if l.startswith("| "))
    assert "worst case" not in header and "50.00" in md


def test_python_m_byzddp_sweep_runs_main(tmp_path, monkeypatch, capsys):
    import runpy
    grid = write_grid(tmp_path, grid_spec(grdi={}))
    monkeypatch.setattr(sys, "argv", ["byzddp.sweep", str(grid), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("byzddp.sweep", run_name="__main__", alter_sys=True)
    assert stop.value.code == 2 and "grdi" in capsys.readouterr().err


def test_ctrl_c_ends_the_running_runs_and_starts_no_other(tmp_path, fake_train, monkeypatch):
    import os
    import signal
    import threading
    import time
    command, started, calls, expect = fake_train
    monkeypatch.setenv("FAKE_SLEEP", "60")
    sw = small_sweep(tmp_path)                  # 4 runs, 2 at a time
    expect(sw)
    threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT)).start()   # as a terminal's Ctrl-C
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(sw, jobs=2, command=command, progress=False)
    assert time.monotonic() - began < 30        # SIGTERM ended the sleeping runs at once
    assert len(started()) == 2                  # the queued two never started
    assert not any("end" in json.loads(l) for l in calls.read_text().splitlines())
    assert [sweep.status(sw, r) for r in sw.runs] == ["pending"] * 4
