"""Trust: every user mistake of issue 30 is one line naming the key and the fix, exit 2, and
nothing already on disk is lost. One table of cases run in-process through byzddp.cli.main,
then the run folder's files (a planted link is never written through), the checkpoints an
earlier run left (never deleted, never silently ignored) and one case under torchrun."""
import hashlib
import os
import signal
import struct
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from byzddp import checkpoint, cli, io, plugins
from helpers import ROOT, TINY, summary, train

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

RULE_CLS = "examples.my_rule:NormFilter"
ATTACK = "examples.my_attack:ScaledReversal"
DATASET = "examples.my_dataset:blobs"

# A module of plug-ins that go wrong, written to a temporary folder on sys.path.
TRUSTED = textwrap.dedent("""
    import torch
    import torch.nn as nn

    def raising_factory(input_shape, classes):
        raise RuntimeError("no model today")

    def raising_loader(root):
        return {}["no such split"]

    def frozen_factory(input_shape, classes):
        return nn.Flatten()

    def nan_loader(root):
        x = torch.zeros(40, 4)
        x[3, 2] = float("nan")
        x[7, 0] = float("nan")
        return (x, torch.arange(40) % 2), (torch.zeros(8, 4), torch.arange(8) % 2)

    def inf_test_loader(root):
        test = torch.zeros(8, 4)
        test[5, 1] = float("inf")
        return (torch.zeros(40, 4), torch.arange(40) % 2), (test, torch.arange(8) % 2)

    def scaled_mean(grads, scale=1.0):
        return scale * grads.mean(dim=0)

    from byzddp.aggregators import Aggregator
    from byzddp.attacks import Attack

    class RaisingRule(Aggregator):
        def __init__(self, f=0):
            raise ValueError("no rule today")

    class RaisingAttack(Attack):
        def __init__(self):
            raise ValueError("no attack today")
""")


def line_of(text: str, fragment: str) -> int:
    """The 1-based line of `fragment` in the module text as written to disk."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if fragment in line)


@pytest.fixture(autouse=True)
def trusted(tmp_path, monkeypatch):
    (tmp_path / "trustplugins.py").write_text(TRUSTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "trustplugins", raising=False)   # this test's file, not an earlier one's
    monkeypatch.syspath_prepend(str(ROOT))
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic))
        for dim in array.shape:
            fh.write(struct.pack(">I", dim))
        fh.write(array.astype(np.uint8).tobytes())


def mnist_files(root: Path, images: int = 100, labels: int = 100, top_label: int = 9) -> None:
    """MNIST IDX files (train and t10k) with `images` images and `labels` labels of at most
    `top_label`, in torchvision's layout."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (images, 28, 28)), 2051)
        y = np.arange(labels) % 10
        y[-1] = top_label
        _write_idx(raw / f"{split}-labels-idx1-ubyte", y, 2049)


def mnist(root: Path) -> list:
    return ["data.dataset=mnist", f"data.root={root}", "data.download=false", "train.batch_size=4"]


# (overrides, set-up of data files or None, fragments of the one error line). {tmp} is the
# test's folder; {line:...} is the line of the fragment in trustplugins.py.
CASES = {
    # plug-in parameters of the wrong type, named by their key at validation
    "attack-arg-type": ([f"attack.name={ATTACK}", "attack.args.scale=abc"], None,
                        ["config key attack.args.scale: 'abc' is a str", "takes a number (its default is 2.0)"]),
    "rule-arg-type": ([f"aggregator.name={RULE_CLS}", "resampling.name=none", "aggregator.args.keep_extra=abc"], None,
                      ["config key aggregator.args.keep_extra: 'abc' is a str", "takes an integer"]),
    "rule-arg-float-for-int": ([f"aggregator.name={RULE_CLS}", "resampling.name=none",
                                "aggregator.args.keep_extra=1.5"], None,
                               ["config key aggregator.args.keep_extra: 1.5 is a float"]),
    "function-rule-arg-type": (["aggregator.name=trustplugins:scaled_mean", "aggregator.args.scale=abc"], None,
                               ["config key aggregator.args.scale: 'abc' is a str", "takes a number"]),
    "dataset-arg-type": ([f"data.dataset={DATASET}", "data.args.spread=abc", "data.partition=iid"], None,
                         ["config key data.args.spread: 'abc' is a str"]),
    "attack-arg-negative": ([f"attack.name={ATTACK}", "attack.args.scale=-1"], None,
                            ["config key attack.args.scale: must be > 0, got -1"]),
    # import paths
    "trailing-colon": (["model.name=examples.my_model:"], None,
                       ["config key model.name: 'examples.my_model:' names no attribute after the ':'"]),
    "dotted-missing-attribute": (["model.name=examples.my_model.no_such_factory"], None,
                                 ["config key model.name: module 'examples.my_model' has no attribute "
                                  "'no_such_factory'; check the name after the last '.'"]),
    "dotted-module-only": (["model.name=examples.my_model"], None,
                           ["config key model.name: 'examples.my_model' is a module; name the object in it as "
                            "examples.my_model:<attribute>"]),
    "unknown-built-in-model": (["model.name=mpl"], None,
                               ["config key model.name: 'mpl' is not one of mlp, cnn", "package.module:factory"]),
    "unknown-built-in-rule": (["aggregator.name=median"], None,
                              ["config key aggregator.name: 'median' is not one of mean, krum"]),
    "unknown-built-in-attack": (["attack.name=alei"], None, ["config key attack.name: 'alei' is not one of adaptive, alie"]),
    "unknown-built-in-dataset": (["data.dataset=mnist4k"], None,
                                 ["config key data.dataset: 'mnist4k' is not one of mnist5k, mnist"]),
    "built-in-rule-args": (["aggregator.name=cm", "aggregator.args.x=1"], None,
                           ["config key aggregator.args: only a plug-in rule", "set aggregator.<param> instead"]),
    "built-in-dataset-args": (["data.args.x=1"], None,
                              ["config key data.args: only a plug-in dataset", "remove data.args"]),
    # plug-ins that raise, or give what cannot train
    "factory-raises": (["model.name=trustplugins:raising_factory"], None,
                       ["config key model.name: 'trustplugins:raising_factory' raised RuntimeError: no model today "
                        "(at {tmp}/trustplugins.py:{line:no model today})"]),
    "loader-raises": (["data.dataset=trustplugins:raising_loader", "data.classes=2"], None,
                      ["config key data.dataset: 'trustplugins:raising_loader' raised KeyError: 'no such split' "
                       "(at {tmp}/trustplugins.py:{line:no such split})"]),
    "rule-constructor-raises": (["aggregator.name=trustplugins:RaisingRule"], None,
                                ["config key aggregator.name: 'trustplugins:RaisingRule' raised ValueError: no rule "
                                 "today (at {tmp}/trustplugins.py:{line:no rule today})"]),
    "attack-constructor-raises": (["attack.name=trustplugins:RaisingAttack"], None,
                                  ["config key attack.name: 'trustplugins:RaisingAttack' raised ValueError: no attack "
                                   "today (at {tmp}/trustplugins.py:{line:no attack today})"]),
    "model-without-parameters": (["model.name=trustplugins:frozen_factory"], None,
                                 ["config key model.name: 'trustplugins:frozen_factory' gave a model with no "
                                  "trainable parameters"]),
    "nan-in-train-features": (["data.dataset=trustplugins:nan_loader", "data.partition=iid", "data.classes=2"], None,
                              ["config key data.dataset: 'trustplugins:nan_loader' train example 3 holds NaN or Inf "
                               "(2 such examples)"]),
    "inf-in-test-features": (["data.dataset=trustplugins:inf_test_loader", "data.partition=iid",
                              "data.classes=2"], None,
                             ["config key data.dataset: 'trustplugins:inf_test_loader' test example 5 holds NaN or Inf"]),
    # built-in torchvision datasets get the same checks
    "mnist-fewer-labels": (None, dict(images=100, labels=90),
                           ["config key data.dataset: mnist (data.root={tmp}/data) has 100 train examples but 90 "
                            "labels"]),
    "mnist-more-labels": (None, dict(images=100, labels=110),
                          ["config key data.dataset: mnist (data.root={tmp}/data) has 100 train examples but 110 "
                           "labels"]),
    "mnist-label-200": (None, dict(images=100, labels=100, top_label=200),
                        ["config key data.dataset: mnist (data.root={tmp}/data) has train labels in [0, 200], "
                         "outside 0..9"]),
    # resume
    "resume-unknown": (["train.resume=sometimes"], None,
                       ["config key train.resume: sometimes does not exist; use off, auto, fresh or a checkpoint path"]),
}


def _expand(fragment: str, tmp_path: Path) -> str:
    out = fragment.replace("{tmp}", str(tmp_path))
    while "{line:" in out:
        start = out.index("{line:")
        end = out.index("}", start)
        out = out[:start] + str(line_of(TRUSTED, out[start + 6:end])) + out[end + 1:]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_is_one_line_naming_the_key_exit_2_and_no_folder(tmp_path, capsys, case):
    overrides, files, fragments = CASES[case]
    if files is not None:
        mnist_files(tmp_path / "data", **files)
        overrides = mnist(tmp_path / "data")
    runs = tmp_path / "runs"
    code = cli.main([*TINY, f"log.dir={runs}", *overrides])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert _expand(fragment, tmp_path) in errors[0], errors[0]
    assert not runs.exists() or not any(runs.iterdir())     # nothing left behind


def test_matching_mnist_files_train(tmp_path, capsys):
    """The counterpart of the mnist cases: the same files, whole, are accepted."""
    mnist_files(tmp_path / "data")
    assert cli.main([*TINY, f"log.dir={tmp_path / 'runs'}", "log.name=r", *mnist(tmp_path / "data")]) == 0


def test_a_function_rule_takes_aggregator_args(tmp_path):
    from byzddp import config, pipeline
    cfg = config.load(None, [*TINY, "aggregator.name=trustplugins:scaled_mean", "aggregator.args.scale=2.5"])
    rule = pipeline.build(cfg).rule
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(rule(x), 2.5 * x.mean(dim=0))


def test_every_kind_resolves_built_in_names_and_paths_through_one_table():
    from byzddp import aggregators, attacks, data, models, validation    # noqa: F401 (register the kinds)
    assert tuple(plugins.kind("data.dataset").built_in) == validation.DATASETS
    assert tuple(plugins.kind("model.name").built_in) == validation.MODELS
    assert tuple(plugins.kind("aggregator.name").built_in) == aggregators.RULES
    assert set(plugins.kind("attack.name").built_in) == set(attacks.ATTACKS)
    assert plugins.resolve("aggregator.name", "krum") is aggregators.rule_class("krum")
    import examples.my_attack
    assert plugins.resolve("attack.name", ATTACK) is examples.my_attack.ScaledReversal
    # Hydra's dotted spelling names the same object
    assert plugins.resolve("attack.name", ATTACK.replace(":", ".")) is examples.my_attack.ScaledReversal


# ---------------------------------------------------------------------------- planted links

def test_a_planted_lock_link_is_refused_and_its_target_untouched(tmp_path, capsys):
    victim = tmp_path / "important.txt"
    victim.write_text("keep me\n")
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    (run_dir / ".lock").symlink_to(victim)
    code = cli.main([*TINY, f"log.dir={tmp_path / 'runs'}", "log.name=x"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: config key log.name: {run_dir / '.lock'} is a symbolic link" in err
    assert victim.read_text() == "keep me\n" and (run_dir / ".lock").is_symlink()


def test_write_atomic_never_writes_through_a_planted_temporary(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    victim = folder / "victim"
    victim.write_text("keep me\n")
    target = folder / "summary.json"
    (folder / f"summary.json.tmp{os.getpid()}").symlink_to(victim)
    io.write_atomic(target, "new\n")
    assert victim.read_text() == "keep me\n" and target.read_text() == "new\n"
    assert not target.is_symlink() and sorted(p.name for p in folder.iterdir()) == ["summary.json", "victim"]


def test_append_line_refuses_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(io.OutputError, match="metrics.jsonl"):
        io.append_line(tmp_path / "metrics.jsonl", "{}")
    assert victim.read_text() == "keep me\n"


# ---------------------------------------------------------------------------- checkpoints left behind

class _Topo:
    is_server = True


class _Stub:
    """What checkpoint.save reads of a trainer."""
    topo = _Topo()

    def __init__(self, step):
        self.step = step

    def state_dict(self):
        return {"step": self.step}


def test_rotation_never_deletes_checkpoints_numbered_above_the_one_written(tmp_path):
    out = checkpoint.folder(tmp_path)
    out.mkdir(parents=True)
    for old in (90, 100):      # another run's, left beside this one
        (out / f"step_{old}.pt").write_bytes(b"old")
        (out / f"step_{old}.pt.sha256").write_text(hashlib.sha256(b"old").hexdigest())
    for step in (2, 4, 6):
        checkpoint.save(_Stub(step), tmp_path, keep=2)
    assert sorted(checkpoint.steps(out)) == [4, 6, 90, 100]
    assert (out / "step_100.pt").read_bytes() == b"old"


def _interrupted(tmp_path) -> list:
    """A finished run with checkpoints, less its summary: what an interrupted run leaves."""
    args = [*TINY, f"log.dir={tmp_path}", "log.name=x", "train.checkpoint_every=2"]
    assert cli.main(args) == 0
    (tmp_path / "x" / "summary.json").unlink()
    return args


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_the_same_command_after_an_interruption_says_how_to_resume_and_keeps_everything(tmp_path, capsys):
    args = _interrupted(tmp_path)
    before = _files(tmp_path / "x")
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert (f"error: config key train.resume: the run folder {tmp_path / 'x'} holds a checkpoint at step 6 of "
            f"this config (an interrupted run); resume it with train.resume=auto, or start over with "
            f"train.resume=fresh") in err
    assert _files(tmp_path / "x") == before


def test_fresh_sets_the_earlier_run_aside_and_trains_as_in_a_new_folder(tmp_path, capsys):
    args = _interrupted(tmp_path)
    before = _files(tmp_path / "x")
    assert cli.main([*args, "train.resume=fresh"]) == 0
    err = capsys.readouterr().err
    aside = [p for p in (tmp_path / "x").iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and f"the earlier run's files are now in {aside[0]}" in err
    kept = _files(aside[0])
    # everything the earlier run wrote is there, byte for byte (owner.json stays in place)
    assert kept == {k: v for k, v in before.items() if k != "owner.json"}
    s = summary(tmp_path / "x")
    assert s["resumed_from"] is None
    clean = [*TINY, f"log.dir={tmp_path}", "log.name=clean", "train.checkpoint_every=2"]
    assert cli.main(clean) == 0
    assert s["model_sha256"] == summary(tmp_path / "clean")["model_sha256"]
    # after fresh, a plain rerun beside the new run's checkpoints is refused as before
    (tmp_path / "x" / "summary.json").unlink()
    assert cli.main(args) == 2


def test_a_finished_run_names_fresh_too(tmp_path, capsys):
    args = [*TINY, f"log.dir={tmp_path}", "log.name=x"]
    assert cli.main(args) == 0
    assert cli.main(args) == 2
    assert "start over with train.resume=fresh" in capsys.readouterr().err


@pytest.mark.slow
def test_the_refusal_after_an_interruption_is_the_processs_one_line(tmp_path):
    """As a user sees it: exit 2, stderr one line, after a run stopped by Ctrl-C's checkpoint."""
    args = [*TINY, f"log.dir={tmp_path}", "log.name=x", "train.checkpoint_every=2"]
    train(args)
    (tmp_path / "x" / "summary.json").unlink()
    proc = train(args, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "holds a checkpoint at step 6" in proc.stderr and "Traceback" not in proc.stderr
    resumed = train([*args, "train.resume=auto"])
    assert "resumed at step 6" in resumed.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_a_plugin_parameter_of_the_wrong_type_under_torchrun(tmp_path):
    runs = tmp_path / "runs"
    proc = train([*TINY, f"log.dir={runs}", f"attack.name={ATTACK}", "attack.args.scale=abc"], nproc=2,
                 check=False)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and ours, proc.stderr[-3000:]
    assert "config key attack.args.scale: 'abc' is a str" in ours[0]
    assert f"traceback : {ours[0]}" in proc.stderr[proc.stderr.index("Root Cause"):]
    assert not runs.exists()
