"""The server side's per-step checks of a rule's output (shape, dtype, device; NaN made by the
rule itself from finite rows), and the loop's stop signal inside a long federated round."""
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from byzddp import aggregators, attacks, config, distributed, trainer as trainer_mod
from byzddp.server import RuleOutputError, Server
from helpers import ROOT, TINY, env, summary, train

BASE = [*TINY, "train.device=cpu", "resampling.name=none", "log.wandb=off"]


class Returns(aggregators.Aggregator):
    """A rule that returns whatever `make(rows)` gives (the stand-in for a broken plug-in)."""
    name = "returns"
    make = None

    def _aggregate(self, x, cols):
        return type(self).make(x)


def server_with(make):
    cfg = config.load(None, [*BASE, "aggregator.name=mean"])
    server = Server(cfg, SimpleNamespace(d=5, nb=0, device=torch.device("cpu")), None, None)
    rule = Returns()
    type(rule).make = staticmethod(make)
    server.aggregator = rule
    return server


@pytest.mark.parametrize("make,fragment", [
    (lambda x: x.mean(0).long(), "dtype torch.int64"),
    (lambda x: x.mean(0)[:4], "shape (4,) for 8 rows of 5 columns"),
    (lambda x: x.mean(0, keepdim=True), "shape (1, 5)"),
    (lambda x: x.mean(0).tolist(), "a list, not a tensor"),
    (lambda x: x.mean(0).to("meta"), "its update on meta"),
])
def test_a_rule_output_that_breaks_the_contract_is_one_line_naming_the_rule(make, fragment):
    server = server_with(make)
    rows = torch.randn(8, 5 + 2)
    with pytest.raises(RuleOutputError) as e:
        server.aggregate(rows, 0, [])
    message = str(e.value)
    assert message.startswith("config key aggregator.name: the rule 'mean' returned ") and fragment in message
    assert "\n" not in message


def test_a_correct_output_passes_the_check():
    server = server_with(lambda x: x.mean(0))
    rows = torch.randn(8, 7)
    server.aggregate(rows, 0, [])
    torch.testing.assert_close(server.payload[:5], rows[:, :5].mean(0))


def test_nan_made_by_the_rule_from_finite_rows_is_told_apart_from_nan_inputs():
    server = server_with(lambda x: x.mean(0) / 0 * 0)        # 0/0: NaN from finite rows
    server.aggregate(torch.randn(8, 7), 3, [])
    with pytest.raises(aggregators.NonFiniteError, match="step 4 .*every row the rule mean saw was finite"):
        server.check_finite()
    server = server_with(lambda x: x.mean(0))
    rows = torch.randn(8, 7)
    rows[2, 1] = float("nan")
    server.aggregate(rows, 0, [])
    with pytest.raises(aggregators.NonFiniteError, match="cannot absorb NaN/Inf inputs"):
        server.check_finite()


def test_a_plug_in_rule_returning_integers_stops_the_run_with_one_line(tmp_path):
    rule = tmp_path / "int_rule.py"
    rule.write_text("def rounded_mean(grads):\n    return grads.mean(0)\n\n"
                    "from byzddp.aggregators import Aggregator\n\n"
                    "class Rounded(Aggregator):\n    name = 'rounded'\n\n"
                    "    def _aggregate(self, x, cols):\n        return x.mean(0).round().int()\n")
    e = dict(env(), PYTHONPATH=str(tmp_path))
    proc = train([*BASE, "aggregator.name=int_rule:Rounded", f"log.dir={tmp_path}"], check=False, environ=e)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: config key aggregator.name: the rule 'int_rule:Rounded' returned dtype torch.int32, "
                     "which would be applied as a truncated update; return it in the rows' dtype (torch.float32)"]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- stop in a long round

LONG_ROUND = [*TINY, "train.steps=2", "train.eval_every=1", "train.local_steps=400", "workers.n=5",
              "workers.momentum=0.5", "train.checkpoint_every=0", "attack.name=ipm"]


def _start(args):
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_training(run, proc, timeout=120):
    """Until the run's config.yaml is written: fit's signal handlers are in place by then."""
    deadline = time.time() + timeout
    while not (run / "config.yaml").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_inside_a_long_round_drops_it_checkpoints_and_resumes_exactly(tmp_path):
    train([*LONG_ROUND, f"log.dir={tmp_path}", "log.name=whole"])
    args = [*LONG_ROUND, f"log.dir={tmp_path}", "log.name=cut", "train.resume=auto"]
    proc = _start(args)
    _wait_for_training(tmp_path / "cut", proc)
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert took < 10, f"the stop took {took:.1f} s"
    assert "signal 15: stopping between two local steps" in err
    assert "partial local steps were dropped; checkpoint written at step" in err and "Traceback" not in err
    checkpoints = sorted((tmp_path / "cut" / "checkpoints").glob("step_*.pt"))
    assert len(checkpoints) == 1
    train(args)
    assert summary(tmp_path / "cut")["model_sha256"] == summary(tmp_path / "whole")["model_sha256"]


def test_a_second_ctrl_c_exits_at_once_with_one_line(monkeypatch, capfd):
    cfg = config.load(None, [*BASE, "train.local_steps=3"])
    t = trainer_mod.Trainer(cfg, distributed.setup(cfg))
    exits = []
    monkeypatch.setattr(trainer_mod.os, "_exit", lambda code: exits.append(code))
    t.request_stop(signal.SIGINT)
    assert exits == [] and t.client.stop_signal == signal.SIGINT
    t.request_stop(signal.SIGINT)
    assert exits == [130]
    err = capfd.readouterr().err.splitlines()
    assert err == ["byzddp: signal 2: stopping between two local steps, then a checkpoint (Ctrl-C again exits "
                   "at once, without one)",
                   "byzddp: interrupted again: exiting now, without a checkpoint of this round"]


def test_a_dropped_round_moves_no_state():
    """The replica, worker momentum and the step are as the round found them."""
    cfg = config.load(None, [*BASE, "train.local_steps=3", "workers.momentum=0.9", "workers.vectorize=false"])
    t = trainer_mod.Trainer(cfg, distributed.setup(cfg))
    t.train_step()
    before = (t.replica.flat_params().clone(), t.client.momentum.clone(), t.step)
    calls = []
    batch = t.client.batch

    def stop_after_two(*args):
        calls.append(args)
        if len(calls) == 2:
            t.client.stop_signal = signal.SIGTERM
        return batch(*args)

    t.client.batch = stop_after_two
    with pytest.raises(trainer_mod.RoundDropped):
        t.train_step()
    assert torch.equal(t.replica.flat_params(), before[0]) and torch.equal(t.client.momentum, before[1])
    assert t.step == before[2]
