"""Config: YAML + dotted overrides, types, unknown keys, impossible settings, CLI error lines."""
import pytest

from byzddp import config
from byzddp.config import ConfigError
from helpers import ROOT


def test_defaults_and_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("workers: {n: 12, byzantine: 2}\ntrain: {lr: 1}\n")
    cfg = config.load(path, ["train.steps=7", "model.hidden=[8, 4]", "log.wandb=off", "attack.rotate=true"])
    assert cfg.workers.n == 12 and cfg.workers.byzantine == 2
    assert cfg.train.steps == 7 and isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.model.hidden == [8, 4]
    assert cfg.log.wandb == "off" and cfg.attack.rotate is True
    assert cfg.aggregator.name == config.AggregatorConfig().name  # untouched keys keep defaults


def test_default_config_file_loads():
    cfg = config.load(ROOT / "configs" / "default.yaml")
    assert cfg.data.dataset == "mnist5k" and cfg.data.partition == "sorted"
    assert cfg.workers.n == 10 and cfg.workers.byzantine == 2
    assert cfg.resampling.name != "none"


@pytest.mark.parametrize("override, words", [
    (["train.stepz=3"], ["train.stepz", "valid keys"]),
    (["train.steps=abc"], ["train.steps", "int"]),
    (["workers.byzantine=5"], ["workers.byzantine", "f < n/2"]),
    (["workers.momentum=1.5"], ["workers.momentum"]),
    (["data.partition=banana"], ["data.partition", "banana"]),
    (["train.steps"], ["no '='"]),
    (["train.lr=-1"], ["train.lr"]),
])
def test_bad_settings_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        config.load(None, override)
    message = str(info.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)


def test_run_name_is_stable_and_depends_on_config():
    a = config.load(None, ["seed=1"])
    b = config.load(None, ["seed=1", "log.dir=elsewhere"])
    c = config.load(None, ["seed=2"])
    assert config.run_name(a) == config.run_name(b)   # log settings do not change the run
    assert config.run_name(a) != config.run_name(c)
    assert config.run_name(config.load(None, ["log.name=mine"])) == "mine"


def test_cli_bad_config_is_one_line_and_exit_2(tmp_path, capsys):
    from byzddp import cli
    assert cli.main(["workers.n=4", "workers.byzantine=2", f"log.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "workers.byzantine" in lines[0]
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())   # nothing half-written


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_more_ranks_than_workers_is_refused(tmp_path, capsys, monkeypatch, rank):
    """Each of 3 ranks (as torchrun would set them up) refuses 2 workers before any group starts;
    rank 0 says so in one line."""
    from byzddp import cli
    for key, value in {"RANK": rank, "WORLD_SIZE": 3, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": 3}.items():
        monkeypatch.setenv(key, str(value))
    assert cli.main(["workers.n=2", "workers.byzantine=0", f"log.dir={tmp_path}"]) == 2
    ours = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert len(ours) == (1 if rank == 0 else 0) and all("workers.n=2" in l for l in ours)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_config_hash_ignores_how_a_run_is_operated():
    base = config.load(None, [])
    same = config.load(None, ["train.checkpoint_every=7", "train.resume=auto", "train.check_every=3",
                              "train.keep_checkpoints=9", "train.timeout_s=5", "log.wandb=offline"])
    other = config.load(None, ["train.lr=0.02"])
    assert config.config_hash(base) == config.config_hash(same) != config.config_hash(other)
