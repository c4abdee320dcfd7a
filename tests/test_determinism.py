"""The determinism promise as docs/guarantees.md states it: same config, seed, thread count (train.threads),
device kind and torch version -> the same model bits, however the run is launched or resumed."""
import shutil

import pytest

from helpers import TINY, env, summary, train


@pytest.mark.slow
@pytest.mark.distributed
def test_plain_python_and_torchrun_agree_and_resume_across(tmp_path):
    plain_env = env()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):   # train.threads, not the launcher, decides
        plain_env.pop(name)
    common = [*TINY, "workers.momentum=0.9", "attack.name=bitflip", "train.checkpoint_every=3"]
    train([*common, f"log.dir={tmp_path / 'plain'}", "log.name=r"], environ=plain_env)
    train([*common, f"log.dir={tmp_path / 'torchrun'}", "log.name=r"], nproc=2)
    plain, ranks = summary(tmp_path / "plain" / "r"), summary(tmp_path / "torchrun" / "r")
    assert plain["threads"] == ranks["threads"] == 1
    assert plain["world_size"] == 1 and ranks["world_size"] == 2
    assert plain["model_sha256"] == ranks["model_sha256"]

    # A checkpoint written under torchrun (step 3) finished under plain python: the same bits.
    run = tmp_path / "torchrun" / "r"
    for late in ("step_6.pt", "step_6.pt.sha256"):
        (run / "checkpoints" / late).unlink()
    (run / "summary.json").unlink()
    train([*common, f"log.dir={tmp_path / 'torchrun'}", "log.name=r", "train.resume=auto"], environ=plain_env)
    resumed = summary(run)
    assert resumed["resumed_from"].endswith("step_3.pt") and resumed["world_size"] == 1
    assert resumed["model_sha256"] == plain["model_sha256"]
