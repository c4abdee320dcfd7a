"""Checkpoints: exact resume, signals, killed and hung ranks, corrupt and unsafe files."""
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, TINY, env, free_port, summary, train

# Worker momentum, a stateful rule and an attack: state that a resume must carry.
STATEFUL = [*TINY, "train.steps=12", "train.checkpoint_every=4", "train.keep_checkpoints=3", "workers.momentum=0.9",
            "aggregator.name=cclip", "attack.name=bitflip", "train.lr_schedule=cosine", "train.momentum=0.5"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """In process: what a subprocess would add (the exit status) is tested by the signal tests."""
    from byzddp import cli
    logs = tmp_path_factory.mktemp("full")
    assert cli.main([*STATEFUL, f"log.dir={logs}", "log.name=full"]) == 0
    return logs / "full"


def _checkpoints(run):
    return sorted(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.pt"))


@pytest.mark.slow
def test_resumed_run_matches_the_uninterrupted_one(tmp_path, uninterrupted):
    assert _checkpoints(uninterrupted) == [4, 8, 12]
    run = tmp_path / "part"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("step_4.pt", "step_4.pt.sha256"):
        shutil.copy(uninterrupted / "checkpoints" / name, run / "checkpoints" / name)
    train([*STATEFUL, f"log.dir={tmp_path}", "log.name=part", "train.resume=auto"])
    s = summary(run)
    assert s["resumed_from"].endswith("step_4.pt")
    assert s["model_sha256"] == summary(uninterrupted)["model_sha256"]
    # the evaluations before the checkpoint are kept, not repeated
    steps = [int(l.split('"step": ')[1].split(",")[0]) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9, 12]


@pytest.mark.slow
def test_auto_resume_without_checkpoint_starts_fresh(tmp_path, uninterrupted):
    train([*STATEFUL, f"log.dir={tmp_path}", "log.name=fresh", "train.resume=auto"])
    s = summary(tmp_path / "fresh")
    assert s["resumed_from"] is None and s["model_sha256"] == summary(uninterrupted)["model_sha256"]


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_skipped(tmp_path, uninterrupted):
    run = tmp_path / "corrupt"
    shutil.copytree(uninterrupted / "checkpoints", run / "checkpoints")
    for name in ("step_12.pt", "step_12.pt.sha256"):
        (run / "checkpoints" / name).unlink()
    newest = run / "checkpoints" / "step_8.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])   # truncated copy
    proc = train([*STATEFUL, f"log.dir={tmp_path}", "log.name=corrupt", "train.resume=auto"])
    assert "skipping checkpoint" in proc.stderr and "step_8.pt" in proc.stderr
    s = summary(run)
    assert s["resumed_from"].endswith("step_4.pt")
    assert s["model_sha256"] == summary(uninterrupted)["model_sha256"]


@pytest.mark.slow
def test_checkpoint_files_are_data_not_code(tmp_path):
    """A checkpoint that would run code when unpickled is refused, and the code never runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "x": Evil()}, path)
    (tmp_path / "evil.pt.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    proc = train([*TINY, f"log.dir={tmp_path}", f"train.resume={path}"], check=False)
    assert proc.returncode == 2 and "train.resume" in proc.stderr
    assert not marker.exists()


def _popen(args, nproc=0, extra=()):
    if nproc:
        # c10d rendezvous: each restart of the group gets fresh store keys (static reuses them).
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra,
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "train.py", *args]
    else:
        cmd = [sys.executable, "train.py", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended early ({proc.returncode}):\n{err[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting")


def _ranks(launcher):
    """The rank processes torchrun started (its children running train.py)."""
    out = subprocess.run(["pgrep", "-P", str(launcher.pid), "-f", "train.py"], capture_output=True, text=True)
    pids = sorted(int(p) for p in out.stdout.split())
    assert len(pids) >= 2, f"expected 2 ranks under torchrun, found {pids}"
    return pids


LONG = [*TINY, "train.steps=1500", "train.eval_every=50", "train.check_every=50", "workers.momentum=0.9",
        "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    logs = tmp_path_factory.mktemp("long")
    train([*LONG, f"log.dir={logs}", "log.name=ref"])
    return summary(logs / "ref")["model_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT], ids=["SIGUSR1", "SIGINT"])
def test_a_stop_signal_checkpoints_then_exits_and_the_resume_is_exact(tmp_path, long_reference, signum):
    """SIGTERM (Slurm), SIGUSR1 and SIGINT (Ctrl-C) all stop every rank at one step."""
    args = [*LONG, f"log.dir={tmp_path}", "log.name=sig", "train.resume=auto"]
    proc = _popen(args)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "resume with train.resume=auto" in err and "Traceback" not in err
    stopped_at = _checkpoints(tmp_path / "sig")
    assert len(stopped_at) == 1 and 100 <= stopped_at[0] < 1500
    train(args)
    assert summary(tmp_path / "sig")["model_sha256"] == long_reference


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_rank_is_restarted_by_torchrun_and_the_run_is_exact(tmp_path, long_reference):
    args = [*LONG, f"log.dir={tmp_path}", "log.name=kill", "train.resume=auto", "train.checkpoint_every=100"]
    proc = _popen(args, nproc=2, extra=["--max-restarts=1"])
    ckpts = tmp_path / "kill" / "checkpoints"
    _wait_for(lambda: ckpts.is_dir() and any(ckpts.glob("*.sha256")), proc)
    workers = _ranks(proc)
    os.kill(workers[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    s = summary(tmp_path / "kill")
    assert s["resumed_from"] is not None
    assert s["model_sha256"] == long_reference


@pytest.mark.slow
@pytest.mark.distributed
def test_hung_rank_stops_the_run_with_the_step_named(tmp_path):
    args = [*LONG, f"log.dir={tmp_path}", "log.name=hang", "train.timeout_s=5"]
    proc = _popen(args, nproc=2)
    metrics = tmp_path / "hang" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, proc)
    workers = _ranks(proc)
    stuck = workers[-1]
    os.kill(stuck, signal.SIGSTOP)
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        try:
            os.kill(stuck, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode != 0
    assert "timed out" in err and "step " in err and "train.timeout_s=5" in err


@pytest.mark.slow
def test_auto_resume_refuses_another_configs_checkpoints(tmp_path, uninterrupted):
    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "other" / "checkpoints")
    proc = train([*STATEFUL, "seed=5", f"log.dir={tmp_path}", "log.name=other", "train.resume=auto"], check=False)
    assert proc.returncode == 2 and "another config" in proc.stderr and "train.resume" in proc.stderr
    assert not (tmp_path / "other" / "summary.json").exists()


# ---------------------------------------------------------------- refused before anything loads

@pytest.fixture
def no_loading(monkeypatch):
    """Records every load into a trainer: a refused checkpoint must never be half-loaded."""
    from byzddp.trainer import Trainer
    loads = []
    monkeypatch.setattr(Trainer, "load_state_dict", lambda self, state: loads.append(state))
    return loads


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _with_digest(path, state):
    torch.save(state, path)
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    return path


def test_an_explicit_checkpoint_of_another_config_is_refused_before_loading(tmp_path, uninterrupted,
                                                                             no_loading, capsys):
    from byzddp import cli
    path = uninterrupted / "checkpoints" / "step_4.pt"
    assert cli.main([*STATEFUL, "seed=5", f"log.dir={tmp_path}", f"train.resume={path}"]) == 2
    line = _error_line(capsys)
    assert "train.resume" in line and str(path) in line and "another config" in line
    assert no_loading == []


def test_a_checkpoint_missing_a_key_is_one_line_naming_it(tmp_path, uninterrupted, no_loading, capsys):
    from byzddp import cli
    state = torch.load(uninterrupted / "checkpoints" / "step_4.pt", weights_only=True)
    del state["optimizer"]
    path = _with_digest(tmp_path / "partial.pt", state)
    assert cli.main([*STATEFUL, f"log.dir={tmp_path}", f"train.resume={path}"]) == 2
    line = _error_line(capsys)
    assert "train.resume" in line and "missing key 'optimizer'" in line
    assert no_loading == []


def test_a_checkpoint_whose_step_disagrees_with_its_name_is_refused(tmp_path, uninterrupted, no_loading,
                                                                     capsys):
    from byzddp import cli
    state = torch.load(uninterrupted / "checkpoints" / "step_4.pt", weights_only=True)
    path = _with_digest(tmp_path / "step_8.pt", state)
    assert cli.main([*STATEFUL, f"log.dir={tmp_path}", f"train.resume={path}"]) == 2
    line = _error_line(capsys)
    assert "train.resume" in line and "step 4" in line and "step 8" in line
    assert no_loading == []


def test_auto_resume_skips_a_checkpoint_whose_step_disagrees_with_its_name(tmp_path, uninterrupted, capsys):
    from byzddp import cli
    run = tmp_path / "misnamed" / "checkpoints"
    run.mkdir(parents=True)
    for name in ("step_4.pt", "step_4.pt.sha256"):
        shutil.copy(uninterrupted / "checkpoints" / name, run / name)
    _with_digest(run / "step_8.pt", torch.load(run / "step_4.pt", weights_only=True))
    assert cli.main([*STATEFUL, f"log.dir={tmp_path}", "log.name=misnamed", "train.resume=auto"]) == 0
    warned = [l for l in capsys.readouterr().err.splitlines() if l.startswith("byzddp: warning: skipping")]
    assert len(warned) == 1 and re.search(r"step_8\.pt: it holds step 4", warned[0])
    s = summary(tmp_path / "misnamed")
    assert s["resumed_from"].endswith("step_4.pt")
    assert s["model_sha256"] == summary(uninterrupted)["model_sha256"]


def test_the_keys_checked_are_the_keys_a_trainer_saves():
    from byzddp import checkpoint, config, distributed
    from byzddp.trainer import Trainer
    cfg = config.load(None, STATEFUL)
    assert set(checkpoint.KEYS) == set(Trainer(cfg, distributed.setup(cfg)).state_dict())
