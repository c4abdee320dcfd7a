"""Vectorized workers (byzddp/workers.py) against the loop, the named row layout, the selection
counts, and the NCCL-per-GPU check."""

import warnings

import pytest
import torch
import torch.nn as nn

from byzddp import attacks, config, data, distributed, models, workers
from byzddp.config import ConfigError
from byzddp.layout import RowLayout, Status
from byzddp.trainer import Trainer
from helpers import TINY

# On the CPU: there the loop's dropout draws (global seed) and the vectorized ones (a generator
# per worker) are the same kernel, so the cnn can be compared too.
BASE = [*TINY, "workers.n=6", "workers.byzantine=1", "attack.name=labelflip", "train.batch_size=4",
        "train.device=cpu"]


def tiny_cifar(monkeypatch):
    g = torch.Generator().manual_seed(0)
    tiny = data.Dataset(torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 10, (48,), generator=g),
                        torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g), 10)
    monkeypatch.setattr(data, "load", lambda cfg: tiny)


def trainer_for(overrides):
    cfg = config.load(None, overrides)
    return Trainer(cfg, distributed.setup(cfg))


def rows_at(trainer, step):
    byzantine = attacks.byzantine_set(trainer.cfg, step)
    trainer.client.compute_rows(step, byzantine)
    return trainer.client.rows.clone()


MODELS = {
    "mlp": ["model.name=mlp"],
    "cnn": ["model.name=cnn"],                                   # dropout
    "resnet20": ["model.name=resnet20", "data.dataset=cifar10"],  # BatchNorm
}
# Rotating Byzantine workers that compute nothing: the computed rows are not contiguous.
SKIPPING = ["model.name=mlp", "attack.name=gaussian", "attack.rotate=true", "workers.byzantine=2",
            "resampling.name=none"]


@pytest.mark.parametrize("model", [*MODELS, "skipping"])
def test_vectorized_rows_equal_the_loops(model, monkeypatch):
    """Every worker's gradient, BatchNorm buffers and loss, with worker momentum over 3 steps and a
    Byzantine worker training on flipped labels, are the loop's within float tolerance. The dropout
    masks are the loop's (same key, same draws), so the cnn matches too."""
    if model == "resnet20":
        tiny_cifar(monkeypatch)
    args = [*BASE, *(SKIPPING if model == "skipping" else MODELS[model]), "workers.momentum=0.5", "workers.chunk=4"]
    vec, loop = trainer_for([*args, "workers.vectorize=true"]), trainer_for([*args, "workers.vectorize=false"])
    assert vec.client.vectorized is not None and loop.client.vectorized is None
    for step in (0, 1, 2):
        a, b = rows_at(vec, step), rows_at(loop, step)
        L = vec.layout
        assert torch.allclose(a[:, L.vector], b[:, L.vector], rtol=1e-4, atol=1e-6)
        assert torch.allclose(a[:, L.buffers], b[:, L.buffers], rtol=1e-5, atol=1e-6)
        assert torch.allclose(a[:, L.loss], b[:, L.loss], rtol=1e-5, atol=1e-6)
        computed = a[:, L.vector].abs().sum(1).gt(0)
        if model == "skipping":     # the Byzantine rows stay zero until forged
            byzantine = attacks.byzantine_set(vec.cfg, step)
            assert computed.tolist() == [w not in byzantine for w in range(6)]
        else:
            assert computed.all()
    assert torch.allclose(vec.client.momentum, loop.client.momentum, rtol=1e-4, atol=1e-6)
    # the replica's own buffers are untouched by the workers' forwards
    for (_, got), (_, want) in zip(vec.model.named_buffers(), loop.model.named_buffers()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_a_workers_gradient_does_not_depend_on_its_chunk(model):
    """Worker 3's vector, loss and dropout masks are the same bits alone in a padded chunk, first
    or last among other workers, or in another chunk split: what makes ranks interchangeable."""
    trainer = trainer_for([*BASE, *MODELS[model], "workers.chunk=4"])
    vec = trainer.client.vectorized
    jobs = [workers.Job(i, w, *trainer.data.batch_of(w, 2)) for i, w in enumerate(range(6))]
    d = trainer.d

    def run(order):
        out, loss = torch.zeros(6, d), torch.zeros(6)
        vec.compute([jobs[i] for i in order], 2, out, None, loss)
        return out[3], loss[3]

    want = run([3])
    for order in ([0, 1, 2, 3, 4, 5], [3, 0, 1, 2], [5, 4, 3], [1, 2, 4, 5, 0, 3]):
        got = run(order)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), order
    if model == "cnn":
        assert vec.dropout, "the cnn's dropout calls were found"
        other, loss = torch.zeros(6, d), torch.zeros(6)
        vec.compute([jobs[3]], 3, other, None, loss)     # another step: another mask
        assert not torch.equal(other[3], want[0])


def test_dropout_masks_are_keyed_by_worker_and_step_and_handle_feature_dropout():
    """Masks from key("dropout", seed, worker, step): equal for the same key, different otherwise;
    nn.Dropout2d draws one value per (sample, channel)."""
    class Net(nn.Module):
        """Like the paper's official MNIST network: Dropout2d after the convolution and also on
        the 2-d output of a linear layer (there it is elementwise), plus a plain Dropout."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.drop2d = nn.Dropout2d(0.5)
            self.fc = nn.Linear(4 * 26 * 26, 10)
            self.fc_drop2d = nn.Dropout2d(0.3)
            self.drop = nn.Dropout(0.25)

        def forward(self, x):
            return self.drop(self.fc_drop2d(self.fc(self.drop2d(self.conv(x)).flatten(1))))

    net = Net()
    vec = workers.VectorizedWorkers(net, 2, seed=7, sample=torch.zeros(5, 1, 28, 28))
    assert [(type(c.module), c.shape) for c in vec.dropout] == [
        (nn.Dropout2d, (5, 4, 1, 1)), (nn.Dropout2d, (5, 10)), (nn.Dropout, (5, 10))]
    assert workers.feature_noise_shape(nn.Dropout1d, (4, 7)) == (4, 1)          # unbatched (C, L)
    assert workers.feature_noise_shape(nn.Dropout3d, (2, 4, 3, 3, 3)) == (2, 4, 1, 1, 1)
    a, b, c = (vec._worker_masks(w, t, "cpu") for w, t in ((1, 0), (1, 0), (2, 0)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0].flatten(), c[0].flatten())
    assert set(a[0].unique().tolist()) <= {0.0, 2.0} and set(a[2].unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    # The vectorized gradient of a feature-dropout net equals the loop's under the same seed.
    x, y = torch.randn(2, 5, 1, 28, 28), torch.randint(0, 10, (2, 5))
    out = torch.zeros(2, sum(p.numel() for p in net.parameters()))
    vec.compute([workers.Job(0, 1, x[0], y[0]), workers.Job(1, 2, x[1], y[1])], 0, out, None, torch.zeros(2))
    from byzddp import streams
    for i, w in enumerate((1, 2)):
        net.zero_grad()
        torch.manual_seed(streams.key("dropout", 7, w, 0))
        with warnings.catch_warnings():     # dropout2d on a 2-d input: deprecated, still elementwise
            warnings.simplefilter("ignore")
            nn.functional.cross_entropy(net(x[i]), y[i]).backward()
        assert torch.allclose(out[i], torch.cat([p.grad.reshape(-1) for p in net.parameters()]), atol=1e-6)


class ItemNet(nn.Module):
    """A model vmap cannot take (a data-dependent Python branch)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out if out.sum().item() > -1e9 else -out


class AlphaNet(ItemNet):
    def __init__(self):
        super().__init__()
        self.drop = nn.AlphaDropout(0.1)


@pytest.mark.parametrize("net,reason", [(ItemNet, "torch.func failed"), (AlphaNet, "AlphaDropout")])
def test_models_vmap_cannot_take_fall_back_to_the_loop_said_once(net, reason, monkeypatch, capsys):
    monkeypatch.setattr(models, "build", lambda cfg, shape, classes: (torch.manual_seed(0), net())[1])
    trainer = trainer_for([*BASE, "workers.vectorize=true"])
    rows_at(trainer, 0)
    first = rows_at(trainer, 1)
    loop = trainer_for([*BASE, "workers.vectorize=false"])
    rows_at(loop, 0)
    assert trainer.client.vectorized is None and torch.equal(first, rows_at(loop, 1))
    said = capsys.readouterr().err + "\n".join(trainer.notes)
    assert said.count("workers computed one by one") == 1 and reason in said


def test_the_chosen_chunk_is_logged_once_at_the_start(tmp_path, capsys):
    from byzddp.logging import RunLogger
    trainer = trainer_for([*BASE, "train.steps=2", "train.eval_every=2", f"log.dir={tmp_path}"])
    trainer.fit(RunLogger(trainer.cfg, tmp_path / "run", True))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "vectorized" in line]
    assert lines == [f"byzddp: workers vectorized with torch.func in chunks of 6 (auto, workers.chunk sets it)"]


def test_auto_chunk_is_a_function_of_the_config_and_bounds_memory():
    assert workers.auto_chunk(10, 1000, 0, 100, "cpu") == 10          # everything fits: all n
    per_worker = 4 * (2 * 10**6 + 3 * 10**6)
    for n in (7, 64, 1000):
        cap = workers.CHUNK_BUDGET["cpu"] // per_worker
        chunk = workers.auto_chunk(n, 10**6, 0, 10**6, "cpu")
        chunks = -(-n // chunk)
        assert chunk <= cap and chunks == -(-n // cap) and chunks * chunk - n < chunks   # fewest, evenest
    per_worker = workers.CHUNK_BUDGET["cpu"] // 50                   # 50 fit: 64 -> two chunks of 32
    assert workers.auto_chunk(64, per_worker // 8, 0, 0, "cpu") == 32
    largest = workers.CPU_LARGEST_TENSOR // 4 // 40                 # one parameter: 40 fit on the CPU
    assert workers.auto_chunk(64, 10, 0, 0, "cpu", largest) == 32
    assert workers.auto_chunk(64, 10, 0, 0, "cuda", largest) == 64
    assert workers.auto_chunk(5, 10**9, 0, 10**9, "cpu") == 1         # never below one worker
    cfg = config.load(None, [*BASE, "model.name=cnn"])
    chunk = {world: Trainer(cfg, distributed.Topology(0, world, 0, torch.device("cpu"), "none", 6)).client.vectorized.chunk
             for world in (1, 2, 3)}
    assert len(set(chunk.values())) == 1, chunk


def test_on_the_cpu_a_chunk_of_a_few_workers_is_computed_one_by_one():
    """The cnn at batch 32: its activations leave 2 of the 6 workers a chunk on the CPU, where the
    loop is faster; the run says so and computes them one by one. workers.chunk forces
    vectorizing; a chunk of 4, a chunk of all n, and every other device vectorize."""
    assert not workers.auto_chunk_pays(6, 2, "cpu") and workers.auto_chunk_pays(6, 4, "cpu")
    assert workers.auto_chunk_pays(3, 3, "cpu") and workers.auto_chunk_pays(25, 1, "cuda")
    args = [*BASE, "model.name=cnn", "train.batch_size=32"]
    auto = trainer_for(args)
    assert auto.client.vectorized is None
    assert auto.notes == ["workers computed one by one: on the CPU this model's activations leave 2 workers "
                          "a vectorized chunk, where the loop is faster (workers.chunk forces vectorizing)"]
    forced = trainer_for([*args, "workers.chunk=2"])
    assert forced.client.vectorized is not None and forced.client.vectorized.chunk == 2


def test_workers_chunk_must_be_positive():
    with pytest.raises(ConfigError, match="workers.chunk"):
        config.load(None, ["workers.chunk=0"])
    assert config.load(None, ["workers.chunk=3"]).workers.chunk == 3
    assert config.load(None, []).workers.vectorize is True


def test_row_layout_names_every_column_once():
    L = RowLayout(d=5, nb=3)
    cols = list(range(L.width))
    named = [*cols[L.vector], *cols[L.buffers], L.loss, L.stop]
    assert named == cols and L.width == 5 + 3 + 2
    assert (L.update, L.train_loss, L.status) == (L.vector, L.loss, L.stop)
    assert [int(s) for s in Status] == [0, 1, 2]


def test_selection_counts_match_the_definition():
    """+1 per selected output for every distinct worker in its group (duplicates counted once)."""
    trainer = trainer_for([*BASE, "aggregator.name=krum", "resampling.name=none"])
    groups = [torch.tensor([0, 0]), torch.tensor([1, 5]), torch.tensor([2, 3, 4]), torch.tensor([5])]
    selected = torch.tensor([2, 0, 1, 2])
    trainer.server.count_selections(selected, groups)
    want = [0] * 6
    for j in selected.tolist():
        for w in set(groups[j].tolist()):
            want[w] += 1
    assert trainer.server.selection_counts.tolist() == want


@pytest.mark.parametrize("backend,local_world,gpus,refused", [
    ("nccl", 4, 2, True), ("auto", 4, 2, True), ("nccl", 2, 2, False), ("gloo", 2, 1, False)])
def test_nccl_refuses_more_ranks_than_gpus_on_a_node(backend, local_world, gpus, refused, monkeypatch):
    import torch.distributed as dist
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    started = []
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(dist, "rendezvous", lambda *a, **k: iter([(object(), 0, 0)]))
    monkeypatch.setattr(dist, "PrefixStore", lambda prefix, store: store)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: started.append(a[0]))
    for k, v in {"RANK": "1", "WORLD_SIZE": str(local_world), "LOCAL_RANK": "1",
                 "LOCAL_WORLD_SIZE": str(local_world)}.items():
        monkeypatch.setenv(k, v)
    cfg = config.load(None, [f"train.backend={backend}", "workers.n=8", "workers.byzantine=1"])
    if refused:
        with pytest.raises(ConfigError, match=r"train.backend=gloo") as e:
            distributed.setup(cfg)
        assert f"nccl with {local_world} ranks on a node with {gpus} GPU(s)" in str(e.value)
        assert "\n" not in str(e.value) and not started
    else:
        topo = distributed.setup(cfg)
        assert started == [backend] and topo.backend == backend and topo.device.type == "cuda"
