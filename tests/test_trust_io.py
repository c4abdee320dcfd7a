"""Input and output at the edges (issue 30): each case the issue names, in tables.

Refusals: one line naming the key and the fix, exit 2, nothing written under log.dir. Outputs:
every run file strict JSON (no NaN), metrics.jsonl lines whole or absent, a shell-quoted W&B
hint, and a Ctrl-C while torch imports is one line and 130. In-process where the behaviour is
a function's; subprocesses only for exit codes a process gives."""
import errno
import json
import os
import shlex
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from byzddp import cli, config, data, datasets, io, logging, wandb_log, yamlio
from byzddp.config import ConfigError
import test_bad_input as bad_input
from helpers import ROOT, TINY, env

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def strict(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as JSON (RFC 8259) does."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def assert_one_line(capsys, args, tmp_path, *words):
    """test_bad_input's check (exit 2, one line naming the words, nothing under log.dir) on TINY runs."""
    return bad_input.assert_one_line(capsys, [*TINY, *args], tmp_path, *words)


# ---------------------------------------------------------------- YAML that expands without bound

def laughs(levels: int, width: int = 9) -> str:
    """Each level a list of `width` aliases of the one before: width**levels values in a few
    hundred bytes."""
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * width)}]" for k in range(1, levels)]
    return "\n".join(lines) + "\n"


BOMBS = {
    "nested aliases": laughs(9) + f"model: {{args: {{x: *l8}}}}\n",
    "recursive anchor": "model: {args: {x: &a [*a]}}\n",
    "deep nesting": "model: {args: {x: " + "[" * 500 + "]" * 500 + "}}\n",
    "deep through aliases": "l0: &l0 [x]\n" + "".join(f"l{k}: &l{k} [*l{k - 1}]\n" for k in range(1, 70))
                            + "model: {args: {x: *l69}}\n",
}


@pytest.mark.parametrize("kind", list(BOMBS))
def test_a_yaml_file_that_expands_without_bound_is_refused_within_a_second(tmp_path, capsys, kind):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMBS[kind])
    assert kind != "nested aliases" or len(path.read_bytes()) < 500
    began = time.monotonic()
    line = assert_one_line(capsys, ["--config", str(path)], tmp_path, f"config file {path}")
    assert time.monotonic() - began < 1.0
    assert {"nested aliases": "aliases expand to more than 100,000 values", "recursive anchor": "recursive anchor",
            "deep nesting": "nested more than 64 levels deep; flatten it",
            "deep through aliases": "nested more than 64 levels deep through its aliases"}[kind] in line


def test_yaml_expansion_is_counted_on_the_graph_not_expanded(monkeypatch):
    """The count: every alias written out, nodes shared as often as they are referred to. Below
    the bound a document with aliases loads as before; one value over it is refused."""
    text = laughs(3, width=4)                 # l0: 4 scalars + list = 5; l1: 4*5 + 1 = 21; l2: 85
    tree = config.read_yaml(text)
    assert tree["l2"] == [[["x"] * 4] * 4] * 4
    root = yamlio._Loader(text).get_single_node()
    # the mapping, 3 keys, and each level's value: 1 + 3 + 5 + 21 + 85
    assert yamlio._expanded_size(root) == 1 + 3 + 5 + 21 + 85
    monkeypatch.setattr(yamlio, "MAX_YAML_VALUES", 115)
    assert config.read_yaml(text) == tree
    monkeypatch.setattr(yamlio, "MAX_YAML_VALUES", 114)
    with pytest.raises(config.YAMLExpansionError):
        config.read_yaml(text)


def test_a_grid_file_that_expands_without_bound_is_refused(tmp_path):
    from byzddp.sweep.grid import load_grid
    path = tmp_path / "grid.yaml"
    path.write_text(laughs(9) + "grid: {seed: *l8}\n")
    began = time.monotonic()
    with pytest.raises(ConfigError, match=f"^grid file {path}: its anchors and aliases expand"):
        load_grid(path)
    assert time.monotonic() - began < 1.0


def test_an_override_that_expands_without_bound_is_refused(tmp_path, capsys):
    value = "[" * 100 + "]" * 100
    assert_one_line(capsys, [f"model.args={{x: {value}}}"], tmp_path, "override 'model.args=...'",
                    "nested more than 64 levels")


# ---------------------------------------------------------------- log.name

LONG = "x" * 256


@pytest.mark.parametrize("name, words", [
    (LONG, ["log.name", "256 bytes", "limit of 255", "shorter name"]),
    ("é" * 128, ["log.name", "256 bytes"]),                 # bytes, not characters
    ("-rf", ["log.name", "starts with '-'"]),
    ("--help", ["log.name", "starts with '-'"]),
    ("", ["log.name", "empty", "remove log.name"]),
    ("/", ["log.name", "plain folder name"]),
    ("..", ["log.name", "plain folder name"]),
    ("a\0b", ["log.name", "plain folder name"]),
], ids=["256 bytes", "128 two-byte characters", "-rf", "--help", "empty", "slash", "dot-dot", "NUL"])
def test_a_bad_log_name_is_one_line(tmp_path, capsys, name, words):
    assert_one_line(capsys, [f"log.name={name}"], tmp_path, *words)


@pytest.mark.parametrize("name, words", [
    ("a\nb", ["log.name", "control character"]),
    ("tab\there", ["log.name", "control character"]),
    ("   ", ["log.name", "empty"]),
])
def test_a_bad_log_name_in_a_file_is_one_line(tmp_path, capsys, name, words):
    path = tmp_path / "c.yaml"
    path.write_text(f"log: {{name: {json.dumps(name)}}}\n")
    assert_one_line(capsys, ["--config", str(path)], tmp_path, *words)


def test_names_up_to_the_limit_are_taken():
    for name in ("x" * 255, "é" * 127, "a-b_c.d+e=1", "run 1"):
        assert config.run_name(config.load(None, [f"log.name={name}"])) == name


def test_a_file_system_with_a_shorter_limit_is_one_line_naming_log_name(tmp_path, capsys, monkeypatch):
    """eCryptfs and some network file systems take fewer than 255 bytes: mkdir says
    ENAMETOOLONG, which is a log.name to shorten, not a log.dir to make writable."""
    from pathlib import Path
    real = Path.mkdir

    def short_limit(self, *args, **kwargs):
        if len(self.name) > 140:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", short_limit)
    assert_one_line(capsys, [f"log.name={'y' * 200}"], tmp_path, "log.name", "200 bytes",
                    "too long for the file system", "shorter log.name")


def _long_plug_in_config(seed: int = 0):
    """A config whose derived name passes 255 bytes: a long plug-in import path (built without
    the import checks, which run_name does not need)."""
    cfg = config.Config(seed=seed)
    cfg.data.dataset = ".".join(["a_rather_long_package_name"] * 12) + ":loader"
    cfg.model.name = ".".join(["models_of_mine"] * 6) + ":factory"
    return cfg


def test_the_derived_name_of_a_long_config_fits_one_file_name(tmp_path):
    cfg = _long_plug_in_config()
    name = config.run_name(cfg)
    untouched = (f"{cfg.data.dataset}".replace(":", ".") + f"-{cfg.data.partition}-")
    assert len(untouched) > 255 and len(name.encode()) <= 255
    assert name.endswith("-" + config.config_hash(cfg)) and name.startswith(untouched[:100])
    (tmp_path / name).mkdir()                              # the file system takes it
    other = config.run_name(_long_plug_in_config(seed=1))
    assert other != name and len(other.encode()) <= 255    # the hash keeps configs apart
    # a short config's name is as it always was
    short = config.Config()
    assert config.run_name(short) == (f"mnist5k-sorted-mlp-n10f2-cm-s_replacement2-none-s0-"
                                      f"{config.config_hash(short)}")


# ---------------------------------------------------------------- data.alpha and data.root

@pytest.mark.parametrize("alpha, words", [
    ("1e-300", ["too small to be represented", "raise data.alpha"]),
    ("1e-38", ["too small to be represented", "raise data.alpha"]),
    ("5e-324", ["too small to be represented", "raise data.alpha"]),
    ("1e-9", ["too small for the float32 Dirichlet draw", "underflowed to an even split", "raise data.alpha"]),
])
def test_an_alpha_too_small_to_be_represented_is_one_line(tmp_path, capsys, alpha, words):
    assert_one_line(capsys, ["data.partition=dirichlet", f"data.alpha={alpha}"], tmp_path, "data.alpha", *words)


def test_an_alpha_whose_draw_underflows_is_refused_not_run_as_an_even_split():
    """Dir(alpha) for small alpha puts nearly all of a class on one shard; torch's float32 draw
    underflows every gamma there and returns exactly 1/k each, an even split. Exactly even
    shares have probability 0 under the true law, so they are refused."""
    labels = torch.arange(1000) % 10
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        even = torch.distributions.Dirichlet(torch.full((2,), 1e-6)).sample()
    assert even.tolist() == [0.5, 0.5]                      # the defect this check stands for
    with pytest.raises(ConfigError, match=r"^config key data.alpha: 1e-06 is too small for the float32 "
                                          r"Dirichlet draw \(class \d's shares underflowed"):
        data.partition(labels, 2, "dirichlet", 0, 1e-6)
    shards = data.partition(labels, 2, "dirichlet", 0, 0.05)   # a small alpha that draws fine
    assert sorted(torch.cat(shards).tolist()) == list(range(1000))
    assert max(abs(len(s) - 500) for s in shards) > 100     # far from even


def _locked(monkeypatch, path):
    """What os.access says as a user without read permission on `path` (tests run as root,
    where chmod 000 does not stop reads)."""
    real = os.access
    monkeypatch.setattr(datasets.os, "access", lambda p, mode, **kw: False if str(p) == str(path) else real(p, mode, **kw))


def test_an_unreadable_data_root_says_it_is_unreadable(tmp_path, capsys, monkeypatch):
    root = tmp_path / "data"
    (root / "MNIST" / "raw").mkdir(parents=True)
    _locked(monkeypatch, root)
    assert_one_line(capsys, ["data.dataset=mnist", f"data.root={root}", "data.download=false"], tmp_path,
                    "config key data.root", f"{root} cannot be read", "permission denied", "readable folder")


def test_an_unreadable_folder_inside_data_root_is_named(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "MNIST" / "raw").mkdir(parents=True)
    (root / "lost+found").mkdir()
    _locked(monkeypatch, root / "lost+found")               # a mount's own: not the dataset's
    with pytest.raises(ConfigError, match="no usable files under"):
        datasets.load_mnist(str(root), download=False)
    _locked(monkeypatch, root / "MNIST" / "raw")
    with pytest.raises(ConfigError, match=f"^config key data.root: {root / 'MNIST' / 'raw'} cannot be read"):
        datasets.load_mnist(str(root), download=False)


def test_a_permission_error_from_the_loader_names_the_file(tmp_path, monkeypatch):
    import torchvision
    blocked = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(blocked))

    monkeypatch.setattr(torchvision.datasets, "MNIST", refuse)
    with pytest.raises(ConfigError, match=f"^config key data.root: {blocked} cannot be read"):
        datasets.load_mnist(str(tmp_path), download=False)


def _without_read_override():
    """In the child, before exec: a root user loses the capabilities that skip permission
    checks (CAP_DAC_OVERRIDE 1, CAP_DAC_READ_SEARCH 2) from its bounding set, so the program
    it runs reads files as their mode bits say; another user already does."""
    if os.geteuid() == 0:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):
            if libc.prctl(24, cap, 0, 0, 0) != 0:              # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.slow
def test_a_data_root_without_read_permission_is_one_line_exit_2(tmp_path):
    """The real thing: a folder of mode 000, train.py reading it without the override."""
    root = tmp_path / "data"
    (root / "MNIST").mkdir(parents=True)
    root.chmod(0)
    try:
        proc = subprocess.run([sys.executable, "train.py", *TINY, f"log.dir={tmp_path / 'runs'}",
                               "data.dataset=mnist", f"data.root={root}", "data.download=false"],
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120,
                              preexec_fn=_without_read_override)
    finally:
        root.chmod(0o755)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines == [f"error: config key data.root: {root} cannot be read (permission denied); give this "
                     f"user read access to it (e.g. chmod -R a+rX {root}) or set data.root to a readable folder"]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ---------------------------------------------------------------- non-finite metrics

class NaNInEvaluation(torch.nn.Module):
    """A model that diverged on one input: at evaluation its logits for the first example of a
    batch are NaN, so the test loss is NaN (the data itself is finite: data.load refuses NaN)."""

    def __init__(self, input_shape, classes):
        super().__init__()
        self.fc = torch.nn.Linear(int(torch.tensor(input_shape).prod()), classes)

    def forward(self, x):
        out = self.fc(x.flatten(1))
        if not self.training:
            out = out.clone()
            out[0, 0] = float("nan")
        return out


def test_finite_json_turns_nan_and_inf_into_null_and_names_them():
    record = {"step": 3, "test_loss": float("nan"), "train_loss": float("inf"), "lr": 0.1,
              "nested": {"a": [1.0, float("-inf")]}, "ok": None}
    got = strict(logging.dumps(record))
    assert got == {"step": 3, "test_loss": None, "train_loss": None, "lr": 0.1,
                   "nested": {"a": [1.0, None]}, "ok": None,
                   "non_finite": {"test_loss": "nan", "train_loss": "inf", "nested.a[1]": "-inf"}}
    assert strict(logging.dumps({"step": 1, "lr": 0.5})) == {"step": 1, "lr": 0.5}   # no flag when none
    assert record["test_loss"] != record["test_loss"]       # the caller's record is left as it was


def test_a_nan_test_loss_never_writes_a_bare_nan(tmp_path, capsys):
    from byzddp.sweep.records import recorded
    code = cli.main([*TINY, f"log.dir={tmp_path}", "log.name=r", "model.name=test_trust_io:NaNInEvaluation",
                     "workers.n=4", "workers.byzantine=0", "attack.name=none",
                     "aggregator.name=mean", "resampling.name=none"])
    assert code == 0, capsys.readouterr().err
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    records = [strict(line) for line in lines]
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        assert r["test_loss"] is None and r["non_finite"] == {"test_loss": "nan"}
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["train_loss"] > 0
    summary = strict((tmp_path / "r" / "summary.json").read_text())
    assert summary["final_test_loss"] is None and summary["non_finite"] == {"final_test_loss": "nan"}
    assert summary["final_test_accuracy"] == records[-1]["test_accuracy"]
    # the sweep's reader gives the number back as it was
    value = recorded(summary, "final_test_loss")
    assert isinstance(value, float) and value != value
    assert recorded(summary, "final_test_accuracy") == summary["final_test_accuracy"]


def test_a_diverged_cell_is_the_worst_case_in_a_sweep_table():
    from byzddp.sweep.records import Table
    nan = float("nan")
    loss = Table("", ["r"], ["a", "b", "c"], {("r", "a"): [1.0], ("r", "b"): [nan], ("r", "c"): [5.0]},
                 attacks=["a", "b", "c"], higher_is_worse=True)
    accuracy = Table("", ["r"], ["a", "b", "c"], {("r", "a"): [90.0], ("r", "b"): [nan], ("r", "c"): [10.0]},
                     attacks=["a", "b", "c"])
    assert loss.worst("r")[1] == "b" and accuracy.worst("r")[1] == "b"


# ---------------------------------------------------------------- metrics.jsonl: whole lines

class FullDisk:
    """os.write on one file as a disk that fills: from the `after`-th write on, the first
    call takes part of the bytes, and every later call fails with ENOSPC."""

    def __init__(self, monkeypatch, name: str, after: int = 1):
        self.name, self.after, self.calls, self.real = name, after, 0, os.write
        monkeypatch.setattr(io.os, "write", self)

    def __call__(self, fd, payload):
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(self.name):
            return self.real(fd, payload)
        self.calls += 1
        if self.calls < self.after:
            return self.real(fd, payload)
        if self.calls == self.after:
            return self.real(fd, bytes(payload)[:len(payload) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_leaves_the_line_absent_not_half_written(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    io.append_line(path, '{"step": 1}')
    FullDisk(monkeypatch, "metrics.jsonl")
    with pytest.raises(io.OutputError, match=f"^could not write {path}: No space left on device"):
        io.append_line(path, json.dumps({"step": 2, "test_accuracy": 0.5}))
    assert path.read_text() == '{"step": 1}\n'


def test_a_full_disk_mid_run_keeps_metrics_jsonl_whole_lines(tmp_path, monkeypatch, capsys):
    FullDisk(monkeypatch, "metrics.jsonl", after=2)         # the second evaluation's line
    assert cli.main([*TINY, f"log.dir={tmp_path}", "log.name=r"]) == 1
    err = capsys.readouterr().err
    line = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "metrics.jsonl" in line[0] and "No space left on device" in line[0]
    text = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [strict(l)["step"] for l in text.splitlines()] == [3]


def test_resume_repairs_a_torn_tail(tmp_path, capsys):
    """A process killed mid-append (SIGKILL, a power cut) can leave half a line; the resumed
    run writes metrics.jsonl again from its checkpoint's evaluations."""
    args = [*TINY, f"log.dir={tmp_path}", "log.name=r", "train.checkpoint_every=3"]
    assert cli.main(args) == 0
    path = tmp_path / "r" / "metrics.jsonl"
    whole = path.read_text()
    first, second = whole.splitlines()
    path.write_text(first + "\n" + second[:len(second) // 2])      # torn at the last line
    (tmp_path / "r" / "summary.json").unlink()                    # the crash came before the summary
    assert cli.main([*args, "train.resume=auto"]) == 0
    assert path.read_text() == whole
    assert [strict(l)["step"] for l in path.read_text().splitlines()] == [3, 6]
    capsys.readouterr()


# ---------------------------------------------------------------- the W&B hint

@pytest.mark.parametrize("folder_name", ["it's mine", "two words", "semi;colon", "$HOME", "plain"])
def test_the_wandb_sync_hint_is_shell_quoted(tmp_path, monkeypatch, capsys, folder_name):
    folder = tmp_path / folder_name / "wandb" / "offline-run-1"
    handle = SimpleNamespace(settings=SimpleNamespace(mode="offline"), dir=str(folder / "files"),
                             summary={}, finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(teardown=lambda: None))
    wandb_log.finish(handle, {"final_test_accuracy": 0.5})
    (line,) = [l for l in capsys.readouterr().err.splitlines() if "wandb sync" in l]
    command = line.split("upload it with: ", 1)[1]
    assert shlex.split(command) == ["wandb", "sync", str(folder)]
    if folder_name == "plain":
        assert command == f"wandb sync {folder}"              # nothing added where nothing is needed


# ---------------------------------------------------------------- Ctrl-C while torch imports

def test_ctrl_c_while_importing_torch_is_one_line_and_130(tmp_path):
    """A real SIGINT, sent by the process to itself in the middle of `import torch` (a stand-in
    torch package first on the path), as a Ctrl-C during the seconds the import takes."""
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\n")
    for launcher, extra in (("plain", {}), ("a torchrun rank", {"RANK": "1", "WORLD_SIZE": "2"})):
        proc = subprocess.run([sys.executable, "train.py", *TINY], cwd=ROOT, capture_output=True, text=True,
                              env={**env(), "PYTHONPATH": str(tmp_path), **extra}, timeout=60)
        who = "rank 1: " if extra else ""
        assert proc.returncode == 130, (launcher, proc.stderr)
        assert proc.stderr.splitlines() == [f"error: {who}interrupted while starting (importing torch); "
                                            f"nothing was run or written"], launcher
