"""The step over real process groups: topology, the exchange, rank-count invariance, outputs."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from byzddp import aggregators, config, data, models, pipeline, streams
from byzddp.distributed import worker_block
from helpers import ROOT, TINY, env, free_port, metrics, summary, train


@pytest.mark.parametrize("n, world", [(n, world) for n in (1, 2, 7, 8, 10, 25, 100)
                                      for world in (1, 2, 3, 4, 8) if world <= n])
def test_worker_blocks_are_contiguous_even_and_cover(n, world):
    blocks = [worker_block(r, world, n) for r in range(world)]
    assert [w for b in blocks for w in b] == list(range(n))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def _probe(tmp_path, nproc, overrides):
    import subprocess
    out = tmp_path / f"probe{nproc}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(ROOT / "tests" / "dist_probe.py"), str(out), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    # Every rank's own lines (a rank's abort, its traceback), then torchrun's tail.
    ranks = [l for l in proc.stderr.splitlines() if "torch/distributed/elastic" not in l]
    assert proc.returncode == 0, (f"torchrun exited {proc.returncode}\n--- ranks' stderr ---\n"
                                  + "\n".join(ranks)[-6000:] + f"\n--- stdout ---\n{proc.stdout[-2000:]}")
    return torch.load(out, weights_only=True)


PROBE = ["workers.n=10", "workers.byzantine=2", "attack.name=bitflip", "model.hidden=[16]",
         "train.batch_size=8", "aggregator.name=cm", "resampling.name=s_replacement", "resampling.s=2",
         "data.test_size=200"]


@pytest.fixture(scope="module")
def brute_force():
    """Each worker's vector computed alone in this process from the config's definitions."""
    cfg = config.load(None, PROBE)
    ds = data.load(cfg)
    wd = data.WorkerData(ds, cfg, byzantine_fixed=[8, 9])
    model = models.build(cfg, (1, 28, 28), 10)
    rows = []
    for w in range(10):
        model.zero_grad()
        x, y = wd.batch_of(w, 0)
        F.cross_entropy(model(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        rows.append(-g if w >= 8 else g)   # bitflip: the last f send -g
    grads = torch.stack(rows)
    p = pipeline.build(cfg)
    outputs, _ = p.pre(grads, streams.generator("resampling", cfg.seed, 0))
    update = p.rule(outputs)
    return cfg, grads, update, model.state_dict()


@pytest.mark.parametrize("nproc", [pytest.param(1, marks=pytest.mark.slow),
                                   pytest.param(4, marks=[pytest.mark.slow, pytest.mark.distributed])])   # 10 workers on 4 ranks: blocks 3, 3, 2, 2, padded
def test_gathered_rows_are_the_workers_vectors_and_the_update_is_the_rule(tmp_path, brute_force, nproc):
    cfg, grads, update, init = brute_force
    got = _probe(tmp_path, nproc, PROBE)
    d = got["d"]
    assert all(torch.equal(got["before"][k], init[k]) for k in init)   # same initial model
    assert torch.allclose(got["gathered"][:, :d], grads, rtol=1e-5, atol=1e-7)
    assert torch.allclose(got["payload"][:d], update, rtol=1e-5, atol=1e-7)
    assert got["agree"]   # every rank received the same payload


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("vectorize,attack,chunk", [("true", "bitflip", "null"), ("true", "labelflip", "4"),
                                                    ("false", "bitflip", "null")])
def test_one_two_four_ranks_give_bit_identical_models(tmp_path, vectorize, attack, chunk):
    """10 workers on 1, 2 (5, 5) and 4 ranks (3, 3, 2, 2: the gather is padded), with worker
    momentum and an attack that computes a gradient; vectorized (one padded chunk of 10 per
    rank, or chunks of 4 that split blocks differently on every rank count) and the loop."""
    shas = {}
    for nproc in (1, 2, 4):
        run = tmp_path / f"r{nproc}"
        args = [*TINY, "workers.n=10", "workers.byzantine=2", "aggregator.name=krum",
                "aggregator.allow_unsafe=true", f"attack.name={attack}", f"log.dir={tmp_path}",
                f"log.name=r{nproc}", "workers.momentum=0.9", f"workers.vectorize={vectorize}",
                f"workers.chunk={chunk}"]
        train(args, nproc=nproc) if nproc > 1 else train(args)
        shas[nproc] = summary(run)["model_sha256"]
        assert summary(run)["world_size"] == nproc
    assert shas[1] == shas[2] == shas[4]


@pytest.mark.slow
def test_run_outputs_follow_the_contract(tmp_path):
    proc = train([*TINY, f"log.dir={tmp_path}", "log.name=out", "aggregator.name=krum",
                  "resampling.name=none", "attack.name=bitflip"])
    run = tmp_path / "out"
    resolved = config.from_dict(__import__("yaml").safe_load((run / "config.yaml").read_text()))
    assert resolved.aggregator.name == "krum" and resolved.train.steps == 6
    rows = metrics(run)
    assert [r["step"] for r in rows] == [3, 6]
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert {"test_loss", "train_loss", "wall_seconds"} <= set(r)
    s = summary(run)
    accs = [r["test_accuracy"] for r in rows]
    assert s["final_test_accuracy"] == accs[-1]
    assert s["final_test_accuracy_last5"] == pytest.approx(sum(accs) / len(accs))
    assert s["best_test_accuracy"] == max(accs)
    assert s["steps"] == 6 and s["wall_seconds"] > 0 and len(s["model_sha256"]) == 64
    assert s["config_hash"] == config.config_hash(resolved)
    # krum selects one vector per step: 6 selections over the 8 logical workers
    assert len(s["selection_counts"]) == 8 and sum(s["selection_counts"]) == 6
    assert s["byzantine_declared"] == 1 and s["byzantine_real"] == 1 and s["byzantine_policy"] == "last_f"
    assert "final test accuracy" in proc.stdout and str(run) in proc.stdout


def test_same_seed_same_model_other_seed_other_model(tmp_path):
    from byzddp import cli
    base = [*TINY, f"log.dir={tmp_path}"]   # in process: what a launch adds is tested elsewhere
    assert cli.main([*base, "log.name=a"]) == 0
    assert cli.main([*base, "log.name=b"]) == 0
    assert cli.main([*base, "log.name=c", "seed=1"]) == 0
    sha = {k: summary(tmp_path / k)["model_sha256"] for k in "abc"}
    assert sha["a"] == sha["b"] != sha["c"]


def test_nan_with_mean_stops_loudly_without_writing_nan_weights(tmp_path, monkeypatch):
    """A non-finite aggregate is never applied: the run stops with the step named."""
    from byzddp import attacks, distributed
    from byzddp.trainer import Trainer

    class NaNAttack(attacks.Attack):
        name = "test-nan"

        def forge(self, ctx):
            for i in ctx.local_byzantine:
                ctx.rows[i].fill_(float("nan"))

    monkeypatch.setitem(attacks.ATTACKS, "test-nan", NaNAttack)
    cfg = config.load(None, [*TINY, "aggregator.name=mean", "resampling.name=none", "attack.name=test-nan"])
    trainer = Trainer(cfg, distributed.setup(cfg))
    trainer.train_step()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    with pytest.raises(aggregators.NonFiniteError, match="step 1 "):
        trainer.server.check_finite()


def test_batchnorm_buffers_come_from_the_first_honest_worker(monkeypatch):
    """resnet20: after a step every replica holds worker 0's running statistics, not a blend."""
    import copy

    from byzddp import distributed
    from byzddp.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    tiny = data.Dataset(torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g),
                        torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g), 10)
    monkeypatch.setattr(data, "load", lambda cfg: tiny)
    cfg = config.load(None, ["data.dataset=cifar10", "model.name=resnet20", "workers.n=3", "workers.byzantine=0",
                             "attack.name=none", "aggregator.name=mean", "resampling.name=none",
                             "train.batch_size=4", "log.progress=false"])
    trainer = Trainer(cfg, distributed.setup(cfg))
    alone = copy.deepcopy(trainer.model).train()
    x, _ = trainer.data.batch_of(0, 0)
    with torch.no_grad():
        alone(x)
    trainer.train_step()
    for (name, got), (_, want) in zip(trainer.model.named_buffers(), alone.named_buffers()):
        assert torch.equal(got, want), name


def test_python_m_byzddp_cli_is_train_py(tmp_path):
    """`python -m byzddp.cli` (the sweep's entry without train.py, and the byzddp-train script's
    function) trains and exits as train.py does: the same model, status 0."""
    import subprocess
    args = [*TINY, f"log.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-m", "byzddp.cli", *args, "log.name=m"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train([*args, "log.name=t"])
    assert summary(tmp_path / "m")["model_sha256"] == summary(tmp_path / "t")["model_sha256"]
