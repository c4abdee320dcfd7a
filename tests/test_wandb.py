"""W&B logging: offline files hold the config, metrics and summary; failures never stop a run."""
import sys
from pathlib import Path

import pytest

from byzddp import wandb_log
from byzddp.config import ConfigError


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real home, no credentials, and a server address where nothing listens."""
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID",
                "WANDB_RESUME"):
        monkeypatch.delenv(key, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / f"wandb-{key.lower()}"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(wandb_log, "_warned", set())


@pytest.fixture
def public_run(monkeypatch):
    """What the run object that `wandb.init` returns saw, read through W&B's public Run API
    (project, group, name, tags, config, summary) and its `log` calls; the real W&B still runs
    and writes its offline files."""
    import wandb
    real_init = wandb.init
    seen = {"history": {}}

    def init(*args, **kwargs):
        run = real_init(*args, **kwargs)
        real_log, real_finish = run.log, run.finish

        def log(data, step=None, **more):
            seen["history"][step] = dict(data)
            return real_log(data, step=step, **more)

        def finish(*more, **kw):
            seen.update(project=run.project, group=run.group, name=run.name, tags=list(run.tags),
                        config=dict(run.config), summary=dict(run.summary), id=run.id)
            return real_finish(*more, **kw)

        run.log, run.finish = log, finish
        return run

    monkeypatch.setattr(wandb, "init", init)
    return seen


def test_offline_run_writes_config_metrics_and_summary(tmp_path, capsys, public_run):
    cfg = {"seed": 3, "aggregator": {"name": "krum", "T": 8}, "train": {"lr": 0.01, "resume": "off"}}
    run_dir = tmp_path / "runs" / "krum-bitflip-seed3"
    handle = wandb_log.start(cfg, run_dir, "offline", "byzddp-test", "fig3", ["rule=krum", "seed=3"],
                             "krum-bitflip-seed3")
    assert handle is not None
    logged = {30: 0.25, 60: 0.5, 90: 0.875}
    for step, acc in logged.items():
        wandb_log.log(handle, {"step": step, "test_accuracy": acc, "train_loss": 2.0 - acc}, step)
    wandb_log.finish(handle, {"final_test_accuracy": 0.875, "selection_counts": [4, 0, 2]})

    # The offline run's files, where W&B documents them: wandb/offline-run-*/run-<id>.wandb.
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    # Once, at the end: where the offline run is and how to upload it.
    told = [l for l in capsys.readouterr().err.splitlines() if "wandb sync" in l]
    assert told == [f"byzddp: W&B offline run in {files[0].parent}; upload it with: wandb sync {files[0].parent}"]
    run_id = (run_dir / wandb_log.ID_FILE).read_text().strip()
    assert files[0].name == f"run-{run_id}.wandb" and public_run["id"] == run_id

    assert (public_run["project"], public_run["group"], public_run["name"]) == ("byzddp-test", "fig3", "krum-bitflip-seed3")
    assert public_run["tags"] == ["rule=krum", "seed=3"]
    config = public_run["config"]
    assert config["seed"] == 3 and config["aggregator"] == {"name": "krum", "T": 8}
    assert config["train"] == {"lr": 0.01, "resume": "off"}

    history = public_run["history"]
    assert sorted(history) == [30, 60, 90]
    for step, acc in logged.items():
        assert history[step]["test_accuracy"] == acc
        assert history[step]["train_loss"] == pytest.approx(2.0 - acc)

    summary = public_run["summary"]
    assert summary["final_test_accuracy"] == 0.875
    assert list(summary["selection_counts"]) == [4, 0, 2]


def test_off_returns_none_and_writes_nothing(tmp_path):
    assert wandb_log.start({}, tmp_path / "run", "off", "p", None, [], "r") is None
    assert not (tmp_path / "run").exists()
    wandb_log.log(None, {"a": 1}, 1)       # no-ops
    wandb_log.finish(None, {"a": 1})


def test_bad_mode_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="log.wandb: 'onlin'"):
        wandb_log.start({}, tmp_path, "onlin", "p", None, [], "r")


def test_missing_wandb_warns_once_offline_and_is_an_error_online(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)       # import wandb -> ImportError
    assert wandb_log.start({}, tmp_path / "a", "offline", "p", None, [], "r") is None
    assert wandb_log.start({}, tmp_path / "b", "offline", "p", None, [], "r") is None
    err = capsys.readouterr().err
    assert err.count("W&B is not installed") == 1
    with pytest.raises(ConfigError, match="log.wandb: online needs the wandb package"):
        wandb_log.start({}, tmp_path / "c", "online", "p", None, [], "r")


def test_a_failing_init_or_log_never_crashes_the_run(tmp_path, monkeypatch, capsys):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("no server here")

    monkeypatch.setattr(wandb, "init", broken_init)
    assert wandb_log.start({}, tmp_path / "run", "online", "p", "g", [], "r") is None
    assert "could not start (RuntimeError: no server here)" in capsys.readouterr().err

    class Broken:
        summary = {}

        def log(self, *a, **k):
            raise OSError("disk full")

        def finish(self):
            raise OSError("disk full")

    wandb_log.log(Broken(), {"a": 1}, 1)
    wandb_log.log(Broken(), {"a": 1}, 2)
    wandb_log.finish(Broken(), {"b": 2})
    err = capsys.readouterr().err
    assert err.count("could not log") == 1 and err.count("could not finish") == 1


def test_a_resumed_run_keeps_its_wandb_id(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first, resume = wandb_log._run_id({"train": {"resume": "off"}}, run_dir)
    assert resume is None and (run_dir / wandb_log.ID_FILE).read_text().strip() == first
    assert wandb_log._run_id({"train": {"resume": "auto"}}, run_dir) == (first, "allow")
    fresh, _ = wandb_log._run_id({"train": {"resume": "off"}}, run_dir)
    assert fresh != first and (run_dir / wandb_log.ID_FILE).read_text().strip() == fresh


@pytest.mark.parametrize("configured, wandb_mode, used", [
    ("off", None, "off"), ("off", "offline", "offline"), ("off", "dryrun", "offline"),
    ("off", "online", "online"), ("off", "disabled", "off"), ("off", "OFFLINE", "offline"),
    ("offline", None, "offline"), ("offline", "online", "offline"), ("online", "offline", "online"),
    ("offline", "disabled", "off"), ("online", "disabled", "off"), ("off", "bogus", "off")])
def test_log_wandb_wins_unless_left_off_and_wandb_mode_disabled_always_wins(configured, wandb_mode, used):
    environ = {} if wandb_mode is None else {"WANDB_MODE": wandb_mode}
    assert wandb_log.effective_mode(configured, environ) == used


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
@pytest.mark.parametrize("wandb_mode, extra, logged", [("offline", [], True), ("disabled", ["log.wandb=offline"], False)])
def test_train_py_honours_wandb_mode(tmp_path, monkeypatch, capsys, wandb_mode, extra, logged):
    import signal

    from byzddp import cli
    from helpers import TINY
    monkeypatch.setenv("WANDB_MODE", wandb_mode)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        assert cli.main([*TINY, f"log.dir={tmp_path}", "log.name=r", *extra]) == 0
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    runs = list((tmp_path / "r" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == (1 if logged else 0)
    assert ("wandb sync" in capsys.readouterr().err) == logged
