"""The server's per-round diagnostics (byzddp/diagnostics.py): against their definitions computed
by brute force from the rows the server held, the selection rates against the rule's own
selection, the same bits on 1 and 2 ranks and under sharded aggregation, the window means of
log.diagnostics_every, and resume."""
import json
import math
import shutil

import pytest
import torch

from byzddp import attacks, config, diagnostics, distributed, streams
from byzddp.trainer import Trainer
from helpers import TINY, metrics, summary, train

BASE = [*TINY, "workers.n=8", "workers.byzantine=2", "train.device=cpu", "log.wandb=off"]


def trainer_for(overrides):
    cfg = config.load(None, [*BASE, *overrides])
    return Trainer(cfg, distributed.setup(cfg))


def gathered_rows(t, step=0):
    """The rows rank 0 would gather at `step`: the workers' vectors, then the attack's."""
    byzantine = attacks.byzantine_set(t.cfg, step)
    t.client.compute_rows(step, byzantine)
    ctx = attacks.AttackContext(step, t.cfg.seed, t.client.rows[:, t.layout.vector], t.topo.workers, byzantine,
                                t.exchange, t.n, t.f_declared, t.attack_pipeline, None)
    t.attack.forge(ctx)
    return t.client.rows.clone(), byzantine


@pytest.mark.parametrize("rule,pre", [("krum", "bucketing"), ("cm", "s_replacement"), ("multikrum", "none"),
                                      ("fltrust", "none")])
def test_the_diagnostics_match_their_definitions(rule, pre):
    t = trainer_for([f"aggregator.name={rule}", f"resampling.name={pre}", "attack.name=alie",
                     "aggregator.allow_unsafe=true"])
    rows, byzantine = gathered_rows(t)
    t.server.aggregate(rows, 0, byzantine, diagnose=True)
    got = t.server.diagnosed.since_last()

    # Brute force, float64, from the definitions.
    x = rows[:, t.layout.vector].double()
    honest = [w for w in range(t.n) if w not in byzantine]
    mean = x[honest].mean(0)
    # The rule's output: the same call again on the same inputs (payload[update] is it, finite).
    update = t.payload[t.layout.update].double()
    error = float(((update - mean) ** 2).sum())
    variance = float(((x[honest] - mean) ** 2).sum(1).mean())
    cosine = float(update @ mean / (update.norm() * mean.norm()))
    assert math.isclose(got["aggregation_error"], error, rel_tol=1e-9)
    assert math.isclose(got["honest_variance"], variance, rel_tol=1e-9)
    assert math.isclose(got["kappa"], error / variance, rel_tol=1e-9)
    assert math.isclose(got["update_cosine"], cosine, rel_tol=1e-9)
    assert got["byzantine_in_round"] == len(byzantine)

    # Selection rates from the rule's own selection and the groups behind its rows.
    if t.server.aggregator.selected is None:
        assert "byzantine_selection_rate" not in got
        return
    _, groups = t.server.resampler(x.float(), streams.generator("resampling", t.cfg.seed, 0))
    kept = set(t.server.aggregator.selected.tolist())
    bad = [any(int(w) in byzantine for w in g) for g in groups]
    for key, side in (("byzantine_selection_rate", True), ("honest_selection_rate", False)):
        rows_of_side = [r for r, b in enumerate(bad) if b == side]
        assert got[key] == sum(r in kept for r in rows_of_side) / len(rows_of_side)


def test_rules_that_do_not_select_report_no_selection_rates():
    t = trainer_for(["aggregator.name=cm", "resampling.name=none", "attack.name=ipm"])
    rows, byzantine = gathered_rows(t)
    t.server.aggregate(rows, 0, byzantine, diagnose=True)
    got = t.server.diagnosed.since_last()
    assert "kappa" in got and "byzantine_selection_rate" not in got and "honest_selection_rate" not in got


def test_a_perfect_rule_has_kappa_zero_and_cosine_one():
    """mean with no attacker: the output is the honest mean, so the error is 0 to rounding."""
    t = trainer_for(["aggregator.name=mean", "resampling.name=none", "attack.name=none", "workers.byzantine=0"])
    rows, byzantine = gathered_rows(t)
    t.server.aggregate(rows, 0, byzantine, diagnose=True)
    got = t.server.diagnosed.since_last()
    assert got["kappa"] < 1e-10 and math.isclose(got["update_cosine"], 1.0, rel_tol=1e-9)


def test_non_finite_values_are_none_and_left_out_of_the_means():
    totals = torch.tensor([math.inf, 4.0, 1.0, math.inf, 1.0], dtype=torch.float64)
    got = diagnostics.of_round(totals, 2, 1)
    assert got["aggregation_error"] is None and got["kappa"] is None and got["honest_variance"] == 2.0
    record = diagnostics.Record()
    record.add(got)
    record.add(diagnostics.of_round(torch.tensor([2.0, 4.0, 1.0, 1.0, 1.0], dtype=torch.float64), 2, 1))
    means = record.run_means()
    assert means["mean_kappa"] == 1.0 and means["mean_honest_variance"] == 2.0
    json.dumps(means, allow_nan=False)


def test_selection_rates_count_a_group_with_a_byzantine_worker_as_byzantine():
    groups = [torch.tensor([0, 1]), torch.tensor([2, 5]), torch.tensor([3, 4]), torch.tensor([5, 6])]
    got = diagnostics.selection_rates(torch.tensor([1, 2, 2]), groups, byzantine=[5])
    assert got == {"byzantine_selection_rate": 0.5, "honest_selection_rate": 0.5}


@pytest.mark.slow
def test_the_evaluation_line_holds_the_mean_of_the_rounds_since_the_last(tmp_path):
    """log.diagnostics_every=1 with an evaluation every step gives each round's values; with an
    evaluation every 3 steps, each line is the mean of its 3 rounds (evaluations draw nothing, so
    both runs take the same steps)."""
    common = [*BASE, "aggregator.name=krum", "resampling.name=bucketing", "attack.name=alie",
              "aggregator.allow_unsafe=true", "log.diagnostics_every=1", "train.steps=6", f"log.dir={tmp_path}"]
    train([*common, "train.eval_every=1", "log.name=each"])
    train([*common, "train.eval_every=3", "log.name=window"])
    each, window = metrics(tmp_path / "each"), metrics(tmp_path / "window")
    for line, rounds in zip(window, (each[0:3], each[3:6])):
        for key in ("kappa", "aggregation_error", "byzantine_selection_rate"):
            assert line[key] == sum(r[key] for r in rounds) / 3
    means = summary(tmp_path / "window")
    assert means["mean_kappa"] == sum(r["kappa"] for r in each) / 6


@pytest.mark.slow
@pytest.mark.distributed
def test_the_same_bits_on_one_and_two_ranks_and_under_sharded_aggregation(tmp_path):
    common = [*BASE, "aggregator.name=krum", "resampling.name=bucketing", "attack.name=alie",
              "aggregator.allow_unsafe=true", "log.diagnostics_every=2", f"log.dir={tmp_path}"]
    train([*common, "log.name=one"])
    train([*common, "log.name=two"], nproc=2)
    train([*common, "log.name=sharded", "train.exchange=sharded"], nproc=2)
    want = metrics(tmp_path / "one")
    assert "kappa" in want[0] and "byzantine_selection_rate" in want[0]
    for name in ("two", "sharded"):
        got = metrics(tmp_path / name)
        for a, b in zip(want, got):
            assert {k: a[k] for k in diagnostics.NAMES if k in a} == {k: b[k] for k in diagnostics.NAMES if k in b}
        assert summary(tmp_path / name)["mean_kappa"] == summary(tmp_path / "one")["mean_kappa"]


@pytest.mark.slow
def test_a_resumed_run_reports_the_same_diagnostics(tmp_path):
    from byzddp import cli
    common = [*BASE, "aggregator.name=krum", "attack.name=alie", "aggregator.allow_unsafe=true",
              "log.diagnostics_every=1", "train.checkpoint_every=3", "train.keep_checkpoints=5", f"log.dir={tmp_path}"]
    assert cli.main([*common, "log.name=whole"]) == 0
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    for name in ("step_3.pt", "step_3.pt.sha256"):
        shutil.copy(tmp_path / "whole" / "checkpoints" / name, tmp_path / "cut" / "checkpoints" / name)
    assert cli.main([*common, "log.name=cut", "train.resume=auto"]) == 0
    whole, cut = summary(tmp_path / "whole"), summary(tmp_path / "cut")
    assert cut["resumed_from"].endswith("step_3.pt")
    assert {k: whole[k] for k in whole if k.startswith("mean_")} == {k: cut[k] for k in cut if k.startswith("mean_")}
    assert metrics(tmp_path / "whole")[-1]["kappa"] == metrics(tmp_path / "cut")[-1]["kappa"]
