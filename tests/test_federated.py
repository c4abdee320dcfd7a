"""Federated rounds: K local steps (train.local_steps), partial participation
(workers.participation), the backdoor attack and the attack success rate; each against its
definition, across the vectorized and loop paths, rank counts and resume, and the one-line
refusals of bad input."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from byzddp import attacks, config, distributed, rounds, trigger
from byzddp.config import ConfigError
from byzddp.trainer import Trainer
from helpers import ROOT, TINY, metrics, summary, train
from test_workers import tiny_cifar

BASE = [*TINY, "workers.n=6", "workers.byzantine=1", "train.batch_size=4", "train.device=cpu",
        "resampling.name=none", "log.wandb=off"]


def trainer_for(overrides):
    cfg = config.load(None, [*BASE, *overrides])
    return Trainer(cfg, distributed.setup(cfg))


def rows_of(t, step, participants=None):
    byzantine = [w for w in attacks.byzantine_set(t.cfg, step) if participants is None or w in participants]
    t.client.compute_rows(step, byzantine, participants, lr=t.optimizer.param_groups[0]["lr"])
    return t.client.rows.clone()


def local_training(t, worker, step, byzantine=False):
    """A worker's round by the definition: a deep copy of the global model, K steps of plain
    torch.optim.SGD at the round's learning rate on its batches t K + k, then
    (global - local) / (lr K); its mean loss; its buffers after the last step."""
    K, lr = t.cfg.train.local_steps, t.optimizer.param_groups[0]["lr"]
    model = copy.deepcopy(t.model).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for k in range(K):
        x, y = t.client.batch(worker, step * K + k, byzantine)
        if t.replica.has_dropout:
            torch.manual_seed(__import__("byzddp").streams.key("dropout", t.cfg.seed, worker, step * K + k))
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    start = torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])
    local = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    buffers = [b.detach().reshape(-1).float() for b in model.buffers()]
    return (start - local) / (lr * K), sum(losses) / K, torch.cat(buffers) if buffers else None


# ---------------------------------------------------------------------------- local steps

@pytest.mark.parametrize("vectorize", ["true", "false"])
def test_k1_sends_the_plain_gradient_bit_for_bit(vectorize):
    t = trainer_for(["train.local_steps=1", f"workers.vectorize={vectorize}", "attack.name=none"])
    assert t.client.local_steps == 1
    rows = rows_of(t, 2)
    for w in range(6):
        x, y = t.data.batch_of(w, 2)
        model = copy.deepcopy(t.model)
        g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        want = torch.cat([v.reshape(-1) for v in g])
        got = rows[w, t.layout.vector]
        if vectorize == "false":
            assert torch.equal(got, want)
        else:
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet20"])
@pytest.mark.parametrize("vectorize", ["true", "false"])
def test_a_round_of_k_steps_sends_global_minus_local_over_lr_k(model, vectorize, monkeypatch):
    """Against K steps of torch.optim.SGD on a copy of the model: the pseudo-gradient, the mean
    loss and (resnet20) the BatchNorm buffers after the last step; dropout (cnn) keyed by
    (worker, t K + k); a Byzantine labelflip worker trains on its flipped labels."""
    extra = {"mlp": ["model.name=mlp"], "cnn": ["model.name=cnn"],
             "resnet20": ["model.name=resnet20", "data.dataset=cifar10"]}[model]
    if model == "resnet20":
        tiny_cifar(monkeypatch)
    t = trainer_for([*extra, "train.local_steps=3", f"workers.vectorize={vectorize}", "attack.name=labelflip",
                     "train.lr=0.1", "workers.chunk=4"])
    L = t.layout
    before = [p.detach().clone() for p in t.model.parameters()]
    rows = rows_of(t, 1)
    for w in range(6):
        want, loss, buffers = local_training(t, w, 1, byzantine=w == 5)
        got = rows[w, L.vector]
        if model == "resnet20" and vectorize == "true":
            # Each worker at its own weights makes vmap's convolutions grouped ones: their rounding
            # flips the odd ReLU whose input is ~0, a discrete change of that unit's gradient.
            # So: the same direction and size within a few percent, not coordinate by coordinate.
            assert float(F.cosine_similarity(got, want, dim=0)) > 0.999, w
            assert float((got - want).norm() / want.norm()) < 0.05, w
            tol = 1e-3
        else:
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), w
            tol = 1e-5
        assert math.isclose(float(rows[w, L.loss]), loss, rel_tol=tol)
        if buffers is not None:
            assert torch.allclose(rows[w, L.buffers], buffers, rtol=100 * tol, atol=10 * tol)
    # the replica is where it was: the server's step has not happened yet
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def test_vectorized_and_loop_local_rounds_agree_with_worker_momentum():
    args = ["model.name=cnn", "train.local_steps=4", "workers.momentum=0.5", "attack.name=labelflip", "train.lr=0.1"]
    vec, loop = trainer_for([*args, "workers.vectorize=true"]), trainer_for([*args, "workers.vectorize=false"])
    assert vec.client.vectorized is not None and loop.client.vectorized is None
    for step in range(3):
        a, b = rows_of(vec, step), rows_of(loop, step)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), step
    assert torch.allclose(vec.client.momentum, loop.client.momentum, rtol=1e-4, atol=1e-5)


def test_local_steps_read_consecutive_batches_per_round():
    """Round t, local step k reads batch index t K + k: the batches of a K-step run are those
    of a K = 1 run, K to a round (none skipped, none repeated)."""
    t = trainer_for(["train.local_steps=3", "attack.name=none"])
    seen = []
    real = t.data.batch_of
    t.data.batch_of = lambda w, i: (seen.append((w, i)), real(w, i))[1]
    rows_of(t, 0)
    rows_of(t, 1)
    assert sorted(i for w, i in seen if w == 0) == [0, 1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.distributed
def test_local_steps_participation_and_backdoor_same_bits_on_1_2_4_ranks_and_resume(tmp_path):
    common = [*BASE, "workers.n=8", "workers.byzantine=2", "train.local_steps=3", "workers.participation=0.75",
              "attack.name=backdoor", "attack.boost=2", "aggregator.name=cm", "workers.momentum=0.5",
              "train.checkpoint_every=3", "train.steps=6"]
    shas = {}
    for nproc in (0, 2, 4):
        train([*common, f"log.dir={tmp_path / str(nproc)}", "log.name=r"], nproc=nproc)
        shas[nproc] = summary(tmp_path / str(nproc) / "r")["model_sha256"]
    # sharded aggregation: each rank a column slice of the drawn workers' rows
    train([*common, "train.exchange=sharded", f"log.dir={tmp_path / 'sharded'}", "log.name=r"], nproc=2)
    shas["sharded"] = summary(tmp_path / "sharded" / "r")["model_sha256"]
    assert len(set(shas.values())) == 1, shas
    plain = tmp_path / "0" / "r"
    s = summary(plain)
    assert s["local_steps"] == 3 and s["workers_per_round"] == 6
    assert 0.0 <= s["final_attack_success_rate"] <= 1.0
    assert all("attack_success_rate" in m for m in metrics(plain))
    lines = [json.loads(x) for x in (plain / "participation.jsonl").read_text().splitlines()]
    cfg = config.load(None, common)
    assert [x["step"] for x in lines] == list(range(1, 7))
    for x in lines:
        assert x["workers"] == rounds.participants(cfg, x["step"] - 1)
        assert x["byzantine"] == [w for w in (6, 7) if w in x["workers"]]
    # resume mid-run (from step 3, on 2 ranks): the same bits, the same round log
    for late in ("step_6.pt", "step_6.pt.sha256"):
        (plain / "checkpoints" / late).unlink()
    (plain / "summary.json").unlink()
    train([*common, f"log.dir={tmp_path / '0'}", "log.name=r", "train.resume=auto"], nproc=2)
    resumed = summary(plain)
    assert resumed["resumed_from"].endswith("step_3.pt") and resumed["model_sha256"] == shas[0]
    assert [json.loads(x) for x in (plain / "participation.jsonl").read_text().splitlines()] == lines


# ---------------------------------------------------------------------------- participation

def test_participants_are_a_seeded_draw_of_round_qn():
    cfg = config.load(None, [*BASE, "workers.n=10", "workers.participation=0.35"])
    assert rounds.workers_per_round(cfg) == 4          # round(3.5) = 4, half up
    draws = [rounds.participants(cfg, s) for s in range(40)]
    assert all(len(d) == 4 and d == sorted(set(d)) and all(0 <= w < 10 for w in d) for d in draws)
    assert draws == [rounds.participants(cfg, s) for s in range(40)]   # a function of (seed, step)
    assert len({tuple(d) for d in draws}) > 20
    # every worker is drawn about q of the time
    counts = torch.bincount(torch.tensor(sum(draws, [])), minlength=10)
    assert counts.min() >= 8 and counts.max() <= 25
    other = config.load(None, [*BASE, "workers.n=10", "workers.participation=0.35", "seed=1"])
    assert [rounds.participants(other, s) for s in range(40)] != draws
    everyone = config.load(None, [*BASE, "workers.n=10"])
    assert rounds.participants(everyone, 3) == list(range(10))


def test_the_rule_sees_only_the_participants_rows():
    """mean without resampling: the update is the mean of the drawn workers' rows, whatever the
    others' rows hold; non-drawn workers compute nothing (their rows stay zero)."""
    t = trainer_for(["workers.n=10", "workers.byzantine=1", "workers.participation=0.5", "aggregator.name=mean",
                     "attack.name=none"])
    drawn = rounds.participants(t.cfg, 4)
    rows = rows_of(t, 4, drawn)
    L = t.layout
    assert [bool(rows[w, L.vector].abs().sum() > 0) for w in range(10)] == [w in drawn for w in range(10)]
    gathered = rows.clone()
    for w in range(10):
        if w not in drawn:
            gathered[w, L.vector] = 1e6
    t.server.aggregate(gathered, 4, [], drawn)
    want = rows[drawn][:, L.vector].mean(0)
    assert torch.allclose(t.payload[L.update], want, rtol=1e-6, atol=1e-8)
    assert math.isclose(float(t.payload[L.train_loss]), float(rows[drawn, L.loss].mean()), rel_tol=1e-6)


def test_selection_counts_name_workers_not_positions_under_participation():
    t = trainer_for(["workers.n=10", "workers.byzantine=1", "workers.participation=0.5", "aggregator.name=krum",
                     "attack.name=none"])
    drawn = rounds.participants(t.cfg, 0)
    rows = rows_of(t, 0, drawn)
    t.server.aggregate(rows, 0, [], drawn)
    counts = t.server.selection_counts.tolist()
    assert sum(counts) == 1 and counts.index(1) in drawn


def test_attacks_see_the_drawn_honest_workers_only():
    t = trainer_for(["workers.n=10", "workers.byzantine=2", "workers.participation=0.6", "attack.name=ipm",
                     "attack.epsilon=1"])
    step = next(s for s in range(50) if 9 in rounds.participants(t.cfg, s))
    drawn = rounds.participants(t.cfg, step)
    t.step = step
    t.train_step()
    honest = [w for w in drawn if w < 8]
    # ipm sends -epsilon times the honest mean: of the drawn honest workers
    rows = rows_of(trainer_for(["workers.n=10", "workers.byzantine=2", "workers.participation=0.6",
                                "attack.name=ipm", "attack.epsilon=1"]), step, drawn)
    assert torch.allclose(t.client.rows[9, t.layout.vector], -rows[honest][:, t.layout.vector].mean(0), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- backdoor

def test_the_trigger_stamps_the_corner_with_each_channels_white_and_poisons_a_share():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, 8, 8, generator=g)
    trig = trigger.Trigger.for_data(x, 10, 3, 7)
    assert torch.equal(trig.value.view(-1), x.amax(dim=(0, 2, 3)))
    stamped = trig.stamp(x[:2])
    for c in range(3):
        assert torch.all(stamped[:, c, -3:, -3:] == x[:, c].max())
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[-3:, -3:] = False
    assert torch.equal(stamped[:, :, mask], x[:2][:, :, mask])     # nothing else touched
    y = torch.arange(10) % 4
    px, py = trig.poison(x, y, 0.25)                                # ceil(2.5) = 3 poisoned
    assert py.tolist() == [7, 7, 7] + y[3:].tolist()
    assert torch.equal(px[:3], trig.stamp(x[:3])) and torch.equal(px[3:], x[3:])
    assert torch.equal(x, torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(0)))   # not in place


def test_attack_success_rate_is_the_share_of_triggered_others_called_the_target():
    t = trainer_for(["attack.name=none"])
    assert t.trigger is not None and t.trigger.target == 0
    x, y = t.ds.test_x, t.ds.test_y
    t.model.eval()
    with torch.no_grad():
        others = y != 0
        pred = t.model(t.trigger.stamp(x[others])).argmax(1)
        want = float((pred == 0).double().mean())
    assert math.isclose(t.evaluate()["attack_success_rate"], want, rel_tol=1e-12)


def test_backdoor_workers_hold_shards_train_on_poison_and_send_boosted():
    t = trainer_for(["attack.name=backdoor", "attack.boost=3", "attack.poison_fraction=0.5",
                     "attack.target_class=2", "attack.trigger_size=5", "workers.vectorize=false"])
    shards = [set(t.data.indices[w].tolist()) for w in range(6)]
    assert all(len(s) < len(t.ds.train_y) for s in shards)                       # the Byzantine one too
    assert sum(len(s) for s in shards) == len(t.ds.train_y) and len(set.union(*shards)) == len(t.ds.train_y)
    x, y = t.client.batch(5, 0, True)
    clean_x, clean_y = t.data.batch_of(5, 0)
    assert y[:2].tolist() == [2, 2] and torch.equal(y[2:], clean_y[2:])
    assert torch.all(x[:2, :, -5:, -5:] == t.ds.train_x.max()) and torch.equal(x[2:], clean_x[2:])
    honest_x, honest_y = t.client.batch(0, 0, False)
    assert torch.equal(honest_y, t.data.batch_of(0, 0)[1])
    rows = rows_of(t, 0)
    model = copy.deepcopy(t.model)
    g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert torch.equal(rows[5, t.layout.vector], torch.cat([v.reshape(-1) for v in g]))
    t.attack.forge(attacks.AttackContext(0, 0, t.client.rows[:, t.layout.vector], t.topo.workers, [5], t.exchange, 6, 1))
    assert torch.equal(t.client.rows[5, t.layout.vector], 3 * rows[5, t.layout.vector])
    assert torch.equal(t.client.rows[:5], rows[:5])


@pytest.mark.slow
def test_backdoor_run_reports_the_attack_success_rate_everywhere(tmp_path):
    train([*BASE, "attack.name=backdoor", "log.wandb=offline", f"log.dir={tmp_path}", "log.name=r"])
    s, m = summary(tmp_path / "r"), metrics(tmp_path / "r")
    assert s["final_attack_success_rate"] == m[-1]["attack_success_rate"]
    assert all(0.0 <= r["attack_success_rate"] <= 1.0 for r in m)
    history = list((tmp_path / "r" / "wandb").rglob("*.wandb"))
    assert history and any(b"attack_success_rate" in p.read_bytes() for p in history)


def test_no_attack_success_rate_where_the_trigger_cannot_be_stamped(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    t = trainer_for(["data.dataset=examples.my_dataset:blobs", "data.partition=iid", "attack.name=none"])
    assert t.trigger is None and "attack_success_rate" not in t.evaluate()
    assert t.summary()["final_attack_success_rate"] is None


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, key", [
    (["train.local_steps=0"], "train.local_steps"),
    (["workers.participation=0"], "workers.participation"),
    (["workers.participation=1.5"], "workers.participation"),
    (["workers.n=10", "workers.byzantine=2", "workers.participation=0.2"], "workers.participation"),
    (["workers.n=10", "workers.byzantine=1", "attack.name=bitflip", "attack.count=5", "workers.participation=0.3"],
     "workers.participation"),
    (["workers.n=10", "workers.byzantine=2", "workers.participation=0.5", "aggregator.name=krum"],
     "workers.participation"),
    (["workers.participation=0.5", "attack.name=mimic"], "workers.participation"),
    (["workers.participation=0.5", "aggregator.name=monna", "attack.name=none"], "workers.participation"),
    (["attack.name=backdoor", "attack.poison_fraction=0"], "attack.poison_fraction"),
    (["attack.name=backdoor", "attack.boost=0"], "attack.boost"),
], ids=["K0", "q0", "q1.5", "all-byzantine-round", "all-attacking-round", "rule-needs-more-rows", "mimic", "monna",
        "poison0", "boost0"])
def test_bad_input_is_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        config.load(None, [*BASE, *overrides])
    text = str(e.value)
    assert "\n" not in text and key in text


def test_a_rule_that_needs_more_rows_than_a_round_gives_says_participation():
    with pytest.raises(ConfigError) as e:
        config.load(None, [*BASE, "workers.n=10", "workers.byzantine=2", "workers.participation=0.5",
                           "aggregator.name=krum"])
    assert "5 of the n=10 workers a round" in str(e.value) and "raise workers.participation" in str(e.value)


@pytest.mark.parametrize("overrides, key", [
    (["data.dataset=examples.my_dataset:blobs", "data.partition=iid", "attack.name=backdoor"], "attack.trigger_size"),
    (["attack.name=backdoor", "attack.trigger_size=29"], "attack.trigger_size"),
    (["attack.name=backdoor", "attack.target_class=10"], "attack.target_class"),
], ids=["not-images", "too-big", "no-such-class"])
def test_a_backdoor_the_data_cannot_take_exits_2_with_one_line(tmp_path, overrides, key):
    proc = train([*BASE, *overrides, f"log.dir={tmp_path}", "log.name=r"], check=False)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- rounds and sweeps

def test_a_round_of_k_local_steps_is_one_exchange():
    t = trainer_for(["train.local_steps=5", "attack.name=none"])
    calls = []
    for name in ("gather", "broadcast"):
        real = getattr(t.exchange, name)
        setattr(t.exchange, name, lambda *a, real=real, name=name: (calls.append(name), real(*a))[1])
    batches = []
    real_batch = t.data.batch_of
    t.data.batch_of = lambda w, i: (batches.append(i), real_batch(w, i))[1]
    t.train_step()
    assert calls == ["gather", "broadcast"] and len(batches) == 5 * 6


def test_sweep_tables_put_the_attack_success_rate_beside_accuracy_worst_is_highest(tmp_path):
    from byzddp import sweep
    from test_sweep import fake_finished, grid_spec, write_grid
    spec = grid_spec(grid={"attack.name": ["none", "bitflip", "labelflip"]}, seeds=[0],
                     table={"rows": "rule", "columns": "attack.name", "metric": "final_test_accuracy",
                            "also": ["final_attack_success_rate"]})
    sw = sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "out")
    asr = {}
    for k, run in enumerate(sw.runs):
        run_dir = fake_finished(sw, run, 0.5)
        s = json.loads((run_dir / "summary.json").read_text())
        asr[run.id] = s["final_attack_success_rate"] = round(0.1 + 0.07 * k, 6)
        (run_dir / "summary.json").write_text(json.dumps(s))
    report = sweep.write_report(sw)
    md = report["markdown"].read_text()
    block = md.split("## final_attack_success_rate")[1].split("## Paired differences")[0]
    assert "## final_test_accuracy" in md.split("## final_attack_success_rate")[0]
    lines = [[c.strip() for c in x.strip("|").split("|")] for x in block.splitlines() if x.startswith("| ")]
    assert lines[0] == ["rule", "none", "bitflip", "labelflip", "worst case"]
    for line in lines[1:]:
        rule = line[0]
        cells = {a: 100 * asr[f"{rule}-{a}-seed0"] for a in ("none", "bitflip", "labelflip")}
        assert line[1:4] == [f"{cells[a]:.2f}" for a in ("none", "bitflip", "labelflip")]
        worst = max(("bitflip", "labelflip"), key=cells.get)       # the highest; none is no attack
        assert line[4] == f"{cells[worst]:.2f} ({worst})"
    rows = list(__import__("csv").DictReader(report["csv"].open()))
    assert all(float(r["final_attack_success_rate"]) == asr[r["run_id"]] for r in rows)


def test_sweep_table_also_must_be_a_list_of_metric_names(tmp_path):
    from byzddp import sweep
    from test_sweep import grid_spec, write_grid
    spec = grid_spec(table={"rows": "rule", "columns": "attack.name", "also": "final_attack_success_rate"})
    with pytest.raises(ConfigError) as e:
        sweep.load_grid(write_grid(tmp_path, spec), out=tmp_path / "out")
    assert "table.also" in str(e.value) and "\n" not in str(e.value)
