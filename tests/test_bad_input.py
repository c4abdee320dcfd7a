"""Bad input, as a new user gives it: one line naming the key and the fix, exit 2, no traceback,
nothing written. Each defect found by trying the CLI has its own test; a generated batch of bad
overrides covers every key."""
import dataclasses
import random
import typing

import pytest
import yaml

from byzddp import cli, config
from byzddp.config import ConfigError
from helpers import ROOT, TINY, summary


def run_cli(capsys, args, log_dir):
    code = cli.main.__wrapped__([f"log.dir={log_dir}", "log.progress=false", *args])  # without @record's handler
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_one_line(capsys, args, tmp_path, *words):
    log_dir = tmp_path / "runs"
    code, lines = run_cli(capsys, args, log_dir)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not log_dir.exists() or not any(log_dir.iterdir())
    return lines[0]


# ----------------------------------------------------------------------------- one test per defect

@pytest.mark.parametrize("override, key", [
    ("train.lr=.nan", "train.lr"),
    ("train.lr=.inf", "train.lr"),
    ("train.momentum=-0.5", "train.momentum"),
    ("train.momentum=1.0", "train.momentum"),
    ("train.weight_decay=-1", "train.weight_decay"),
    ("model.hidden=[-5]", "model.hidden[0]"),
    ("model.hidden=[8, 0]", "model.hidden[1]"),
    ("train.timeout_s=.inf", "train.timeout_s"),
    ("train.timeout_s=1e300", "train.timeout_s"),
    ("attack.sigma=.nan", "attack.sigma"),
    ("seed=-1", "seed"),
    ("train.threads=0", "train.threads"),
    ("data.test_size=15", "data.test_size"),
])
def test_senseless_numbers_are_refused(capsys, tmp_path, override, key):
    assert_one_line(capsys, [override], tmp_path, key)


def test_nan_dirichlet_alpha_is_refused(capsys, tmp_path):
    assert_one_line(capsys, ["data.partition=dirichlet", "data.alpha=.nan"], tmp_path, "data.alpha", "finite")


def test_negative_lr_decay_is_refused(capsys, tmp_path):
    # It would run a negative learning rate (gradient ascent) after step 5 and exit 0.
    assert_one_line(capsys, ["train.lr_schedule=step", "train.lr_decay_steps=[5]", "train.lr_decay=-1"],
                    tmp_path, "train.lr_decay")


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/absname", "a/b", "..", "."])
def test_run_name_cannot_leave_log_dir(capsys, tmp_path, name):
    assert_one_line(capsys, [f"log.name={name}"], tmp_path, "log.name", "folder name")


def test_scientific_floats_are_floats(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; the docs print defaults written this way.
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 1e-3, weight_decay: 5E-4}\naggregator: {tau: 1e+1}\n")
    cfg = config.load(path, ["attack.sigma=2e2"])
    assert cfg.train.lr == 1e-3 and cfg.train.weight_decay == 5e-4
    assert cfg.aggregator.tau == 10.0 and cfg.attack.sigma == 200.0
    assert config.load(None, ["train.lr=1e-3"]).train.lr == 1e-3
    assert config.load(None, ["log.name=1e3x"]).log.name == "1e3x"   # not a number: stays a string


def test_duplicate_yaml_keys_are_refused(capsys, tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 0.1\n  steps: 5\n  lr: 0.2\n")
    line = assert_one_line(capsys, ["--config", str(path)], tmp_path, str(path), "'lr'", "twice", "line 4")
    assert "keep one" in line


def test_a_section_given_a_scalar_is_refused(capsys, tmp_path):
    path = tmp_path / "zero.yaml"
    path.write_text("data: 0\n")
    assert_one_line(capsys, ["--config", str(path)], tmp_path, "data", "mapping")


def test_a_yaml_list_as_config_is_refused(capsys, tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train.steps: 5\n- seed: 1\n")
    assert_one_line(capsys, ["--config", str(path), "train.steps=3"], tmp_path, str(path), "not a mapping")


def test_binary_and_unreadable_config_files_are_refused(capsys, tmp_path):
    binary = tmp_path / "model.pt"
    binary.write_bytes(bytes(range(256)) * 4)
    assert_one_line(capsys, ["--config", str(binary)], tmp_path, str(binary), "not a text file")
    folder = tmp_path / "configs"
    folder.mkdir()
    assert_one_line(capsys, ["--config", str(folder)], tmp_path, str(folder))


def test_options_and_overrides_in_any_order(tmp_path):
    args = cli.parse_args(["train.steps=2", "--config", "configs/default.yaml", "log.dir=x"])
    assert args.config == "configs/default.yaml" and args.overrides == ["train.steps=2", "log.dir=x"]
    from byzddp import sweep
    out = tmp_path / "sweep"
    assert sweep.main(["configs/sweeps/smoke.yaml", "train.steps=2", "--list-only", "--out", str(out),
                       "train.batch_size=4"]) == 0
    lines = (out / "runs.txt").read_text().splitlines()
    assert lines and all("train.steps=2" in l and "train.batch_size=4" in l for l in lines)


def test_allow_unsafe_warns_in_one_clean_line(capsys, tmp_path):
    code, lines = run_cli(capsys, ["aggregator.name=krum", "aggregator.allow_unsafe=true", *TINY,
                                   "train.steps=1", "workers.n=8", "workers.byzantine=2"], tmp_path)
    assert code == 0, lines
    warned = [l for l in lines if "warning" in l]
    assert len(warned) == 1 and warned[0].startswith("byzddp: warning: aggregator krum needs")
    assert "UserWarning" not in warned[0] and "set aggregator.allow_unsafe" not in warned[0]
    assert "running outside the rule's guarantee" in warned[0]


def test_garbage_torchvision_files_are_one_line(capsys, tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(bytes(range(200)) * 5)
    assert_one_line(capsys, ["data.dataset=mnist", "data.download=false", f"data.root={tmp_path / 'data'}"],
                    tmp_path, "data.dataset=mnist", "no usable files", str(tmp_path / "data"))


# ----------------------------------------------------------------------------- generated bad overrides

# Keys whose negative (and, unless listed in ZERO_OK, zero) values are never valid.
NOT_NEGATIVE = ["seed", "data.alpha", "data.test_size", "workers.n", "workers.byzantine", "workers.momentum",
                "aggregator.T", "aggregator.nu", "aggregator.tau", "aggregator.L", "aggregator.m",
                "aggregator.b", "resampling.s", "resampling.tau", "attack.count", "attack.sigma", "attack.epsilon",
                "attack.warmup", "attack.delay", "attack.gamma_init", "attack.gamma_tol", "train.steps",
                "train.lr", "train.momentum", "train.weight_decay", "train.lr_decay", "train.batch_size",
                "train.eval_every", "train.eval_batch_size", "train.check_every", "train.checkpoint_every",
                "train.keep_checkpoints", "train.timeout_s", "train.threads"]
CHOICES = ["data.dataset", "data.partition", "data.byzantine_data", "model.name", "aggregator.name",
           "resampling.name", "attack.name", "attack.perturbation", "train.lr_schedule", "train.device",
           "train.backend", "log.wandb"]


def _leaves(cls=config.Config, prefix=""):
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _leaves(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hint


def _bad_overrides():
    cases = []
    for key, hint in _leaves():
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint
        if base is int:
            cases += [(f"{key}=abc", key), (f"{key}=1.5", key), (f"{key}=[1]", key), (f"{key}=.nan", key)]
        elif base is float:
            cases += [(f"{key}=abc", key), (f"{key}=.nan", key), (f"{key}=.inf", key), (f"{key}=-.inf", key),
                      (f"{key}=[0.5]", key), (f"{key}=true", key)]
        elif base is bool:
            cases += [(f"{key}=maybe", key), (f"{key}=2", key)]
        elif typing.get_origin(base) is list:
            cases.append((f"{key}={{a: 1}}", key))
            if typing.get_args(base)[0] is int:
                cases.append((f"{key}=[abc]", key))
        section = key.rsplit(".", 1)[0] if "." in key else ""
        cases.append((f"{section + '.' if section else ''}{key.split('.')[-1]}x=1", key.split('.')[-1] + "x"))
    cases += [(f"{key}=-3", key) for key in NOT_NEGATIVE]
    cases += [(f"{key}=no_such_thing", key) for key in CHOICES]
    cases += [("nosuch.key=1", "nosuch"), ("train=5", "train"), ("train.lr.sub=1", "train.lr"),
              ("=3", "no key"), ("train.steps", "no '='")]
    return cases


BAD = _bad_overrides()
# A few valid settings around the bad one, so that errors do not depend on the defaults alone.
GOOD = [["seed=3"], ["workers.n=12", "workers.byzantine=2"], ["aggregator.name=rfa"],
        ["resampling.name=bucketing"], ["attack.name=ipm"], ["model.hidden=[8]"], ["train.lr=2e-2"],
        ["data.partition=iid"]]


def test_generated_bad_overrides_are_one_line_each(capsys, tmp_path):
    assert len(BAD) >= 200
    rng = random.Random(0)
    log_dir = tmp_path / "runs"
    for override, words in BAD:
        bad_key = override.split("=", 1)[0]
        # train.steps=1 first: should a case be accepted by mistake, it fails fast.
        bundles = [["train.steps=1"], *rng.sample(GOOD, rng.randint(0, 3))]
        context = [g for bundle in bundles for g in bundle if g.split("=", 1)[0] != bad_key]
        args = [*context, override] if rng.random() < 0.5 else [override, *context]
        code, lines = run_cli(capsys, args, log_dir)
        assert code == 2, (args, lines)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, lines)
        assert words in lines[0], (args, lines[0])
    assert not log_dir.exists()
