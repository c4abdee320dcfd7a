"""Run folders: one owner config, one live run at a time, files that survive a full disk,
progress lines that read well in a log file, and error lines that start on their own line."""
import errno
import os
import signal
import subprocess
import sys

import pytest

from byzddp import cli, io
from helpers import ROOT, TINY, env, metrics, summary

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def run(tmp_path, *extra):
    return cli.main([*TINY, f"log.dir={tmp_path}", "log.name=r", *extra])


# ---------------------------------------------------------------- one config per folder

def test_a_folder_of_another_config_is_refused_and_its_summary_kept(tmp_path, capsys):
    assert run(tmp_path) == 0
    before = (tmp_path / "r" / "summary.json").read_bytes()
    capsys.readouterr()
    assert run(tmp_path, "seed=1") == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "r") in line and "another config" in line and "log.name" in line
    assert (tmp_path / "r" / "summary.json").read_bytes() == before


def test_a_finished_run_is_not_overwritten_unless_resumed(tmp_path, capsys):
    """The same config again (on any number of ranks: world size is not part of the config):
    refused without train.resume, allowed with train.resume=auto and then the same model."""
    assert run(tmp_path) == 0
    first = summary(tmp_path / "r")
    capsys.readouterr()
    assert run(tmp_path) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "summary.json" in line and "train.resume=auto" in line
    assert summary(tmp_path / "r") == first
    assert run(tmp_path, "train.resume=auto") == 0
    assert summary(tmp_path / "r")["model_sha256"] == first["model_sha256"]


def test_an_unfinished_run_of_the_same_config_may_start_again(tmp_path, capsys):
    assert run(tmp_path) == 0
    (tmp_path / "r" / "summary.json").unlink()           # as if it had died before the end
    assert run(tmp_path) == 0
    assert [r["step"] for r in metrics(tmp_path / "r")] == [3, 6]


def test_operational_settings_do_not_change_the_owner(tmp_path):
    assert run(tmp_path, "train.checkpoint_every=3") == 0
    assert run(tmp_path, "train.checkpoint_every=2", "train.resume=auto", "log.progress=true") == 0


LONG = [*TINY, "train.steps=100000", "train.eval_every=20", "train.checkpoint_every=0"]


def _start_and_wait_for_an_evaluation(args):
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = []
    while not (seen and seen[-1].startswith("step ")):
        line = proc.stderr.readline()
        assert line, f"train.py ended early ({proc.wait()}): {''.join(seen)}"
        seen.append(line)
    return proc


def _kill(proc):
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.mark.slow
def test_a_second_live_run_in_the_same_folder_is_refused(tmp_path, capsys):
    args = [*LONG, f"log.dir={tmp_path}", "log.name=r"]
    first = _start_and_wait_for_an_evaluation(args)

    def too_long(*_):
        raise AssertionError("the second run was not refused: it is training")

    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(60)
    try:
        assert cli.main(args) == 2
        line = one_error_line(capsys.readouterr().err)
        assert str(tmp_path / "r") in line and "in use" in line
    finally:
        signal.alarm(0)
        _kill(first)
    steps = [r["step"] for r in metrics(tmp_path / "r")]
    assert steps == list(range(20, 20 * len(steps) + 1, 20))     # only the first run's lines
    # The lock dies with its holder (a preempted or killed job): the same config may go on.
    _kill(_start_and_wait_for_an_evaluation(args))


def test_log_dir_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert cli.main([*TINY, f"log.dir={tmp_path / 'afile' / 'sub'}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "log.dir" in line and str(tmp_path / "afile") in line


# ---------------------------------------------------------------- full disk, read-only folder

def _fail_on(monkeypatch, name: str, where: str, code: int = errno.ENOSPC):
    """Make the os call `where` (replace or fsync) fail with `code` for files named `name`.
    (Tests run as root, where a chmod'ed folder stays writable: the error is injected.)"""
    real = getattr(os, where)

    def failing(*args, **kwargs):
        target = args[1] if where == "replace" else os.readlink(f"/proc/self/fd/{args[0]}")
        if os.path.basename(str(target)).startswith(name):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(io.os, where, failing)


def _leftovers(run_dir):
    return sorted(p.name for p in run_dir.rglob("*") if ".tmp" in p.name)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_write_atomic_keeps_the_old_file_and_no_temporary_on_failure(tmp_path, monkeypatch, code):
    target = tmp_path / "f.json"
    io.write_atomic(target, "old")
    _fail_on(monkeypatch, "f.json", "replace", code)
    with pytest.raises(io.OutputError) as failed:
        io.write_atomic(target, "new")
    assert str(failed.value) == (f"could not write {target}: {os.strerror(code)}; "
                                 f"free space or move log.dir to a writable folder")
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_full_disk_while_checkpointing_is_one_line_and_keeps_earlier_checkpoints(tmp_path, monkeypatch,
                                                                                 capsys, where):
    from byzddp import checkpoint
    _fail_on(monkeypatch, "step_4.pt", where)
    assert run(tmp_path, "train.steps=6", "train.checkpoint_every=2") == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "r" / "checkpoints" / "step_4.pt") in line and "No space left on device" in line
    assert _leftovers(tmp_path) == []
    ckpts = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2.pt", "step_2.pt.sha256"]
    assert checkpoint.read(ckpts / "step_2.pt", "cpu")["step"] == 2


def test_full_disk_while_writing_the_summary_is_one_line(tmp_path, monkeypatch, capsys):
    _fail_on(monkeypatch, "summary.json", "replace")
    assert run(tmp_path) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "r" / "summary.json") in line and "No space left on device" in line
    assert _leftovers(tmp_path) == [] and not (tmp_path / "r" / "summary.json").exists()


def test_full_disk_while_appending_metrics_is_one_line(tmp_path, monkeypatch, capsys):
    real = os.write

    def full(fd, payload):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, payload)

    monkeypatch.setattr(io.os, "write", full)
    assert run(tmp_path) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "metrics.jsonl" in line and "No space left on device" in line


# ---------------------------------------------------------------- progress and error lines

def test_progress_in_a_log_file_is_plain_lines(tmp_path, capsys):
    """stderr is not a terminal here (captured): no carriage returns, one line per evaluation."""
    assert run(tmp_path, "log.progress=true") == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [l.split(":")[0] for l in err.splitlines() if l.startswith("step ")] == ["step 3/6", "step 6/6"]


def test_progress_in_a_log_file_has_a_line_between_evaluations(tmp_path, monkeypatch, capsys):
    """A slow run still shows a sign of life in a log file (here: every step, interval 0)."""
    from byzddp import logging
    monkeypatch.setattr(logging, "HEARTBEAT_S", 0.0)
    assert run(tmp_path, "log.progress=true") == 0
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("step ")]
    assert [l.split(":")[0].split(",")[0] for l in lines] == \
        ["step 1/6", "step 2/6", "step 3/6", "step 3/6", "step 4/6", "step 5/6", "step 6/6", "step 6/6"]
    assert "step/s" in lines[-1] and "\r" not in "".join(lines)


def test_an_error_starts_on_its_own_line_and_names_the_step_as_the_bar_counts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert run(tmp_path, "log.progress=true", "aggregator.name=mean", "resampling.name=none",
               "attack.name=nan") == 1
    err = capsys.readouterr().err
    assert "\r" in err                                   # the bar was drawn
    lines = [l for l in err.split("\n") if "error:" in l]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "step 1 " in lines[0] and "1/6" in err


def test_a_collective_failure_names_the_step_as_the_bar_counts():
    """The step being taken when it fails is number step+1, as the bar and metrics.jsonl count."""
    from types import SimpleNamespace

    from byzddp.trainer import CollectiveError, Trainer

    def broken():
        raise RuntimeError("connection reset")

    fake = SimpleNamespace(step=4, topo=SimpleNamespace(world=2), train_step=broken,
                           cfg=SimpleNamespace(train=SimpleNamespace(timeout_s=5)))
    with pytest.raises(CollectiveError, match=r"^step 5: "):
        Trainer.guarded_step(fake)


# ---------------------------------------------------------------- Ctrl-C outside training

def test_ctrl_c_before_training_is_one_line_and_the_handlers_are_given_back(tmp_path, monkeypatch, capsys):
    from byzddp import trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGINT)
    assert run(tmp_path) == 0
    assert signal.getsignal(signal.SIGINT) is before          # fit's stop handler lives with the run
    capsys.readouterr()
    monkeypatch.setattr(trainer.Trainer, "__init__", interrupted)
    assert run(tmp_path, "seed=3", "log.name=other") == 128 + signal.SIGINT
    assert "interrupted" in one_error_line(capsys.readouterr().err)


def test_a_filesystem_without_locks_warns_and_runs(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert run(tmp_path) == 0
    warned = [l for l in capsys.readouterr().err.splitlines() if l.startswith("byzddp: warning: cannot lock")]
    assert len(warned) == 1 and "No locks available" in warned[0]
    assert (tmp_path / "r" / "summary.json").exists()
