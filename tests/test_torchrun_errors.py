"""Our errors under torchrun: the one `error: ...` line is printed by the ranks and is also the
root cause in torchrun's failure report, which torchrun prints last (not "To enable traceback")."""
import pytest

from helpers import TINY, train


def failure_report(proc, words):
    assert proc.returncode != 0, proc.stderr[-3000:]
    err = proc.stderr
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert ours and all(w in ours[0] for w in words), err[-3000:]
    assert err.splitlines()[0] == ours[0], err[-3000:]      # the ranks write before torchrun
    root = err[err.index("Root Cause"):]                    # the end of torchrun's report
    assert f"traceback : {ours[0]}" in root, err[-3000:]
    assert "To enable traceback" not in err
    tail = [line for line in err.splitlines() if line.strip()][-3:]
    assert any(ours[0] in line for line in tail), tail
    # torchrun's own traceback (the launcher's ChildFailedError) stays; none comes from our code.
    frames = [line for line in err.splitlines() if line.lstrip().startswith('File "')]
    assert not any("byzddp" in f or "train.py" in f for f in frames), frames


@pytest.mark.parametrize("args, words", [
    (["train.steps=0"], ["train.steps"]),                                 # at config load
    (["workers.n=1", "workers.byzantine=0", "resampling.s=1"], ["2 ranks", "workers.n=1"]),
])
def test_config_error_is_the_root_cause(tmp_path, args, words):
    failure_report(train([*TINY, f"log.dir={tmp_path}", *args], nproc=2, check=False), words)


def test_error_after_the_group_started_is_the_root_cause(tmp_path):
    # log.dir is a file: rank 0 refuses the run folder once the process group is up.
    (tmp_path / "file").write_text("")
    proc = train([*TINY, f"log.dir={tmp_path / 'file' / 'runs'}"], nproc=2, check=False)
    failure_report(proc, ["log.dir", "is a file"])
