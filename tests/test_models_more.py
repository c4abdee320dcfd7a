"""resnet18 (CIFAR variant) and the model table of docs/models.md, checked against the built models."""
import re

import pytest
import torch
import torch.nn as nn

from byzddp import attacks, config, data, distributed, models, validation
from byzddp.config import ConfigError
from byzddp.trainer import Trainer
from helpers import ROOT, TINY

SHAPES = {"mlp": (1, 28, 28), "cnn": (1, 28, 28), "cnn_relu": (1, 28, 28), "resnet20": (3, 32, 32),
          "resnet18": (3, 32, 32), "gpt": (64,)}


def build(name, classes=10):
    extra = ["data.dataset=cifar10"] if name.startswith("resnet") else ["data.dataset=text"] if name == "gpt" else []
    return models.build(config.load(None, [f"model.name={name}", *extra]), SHAPES[name], classes)


def table():
    """{name: (count for 10 classes, count for 100 classes or None)} from docs/models.md."""
    rows = {}
    for line in (ROOT / "docs" / "models.md").read_text().splitlines():
        m = re.match(r"\| `(\w+)` \|.*\| ([\d,]+) \| ([\d,]+|—) \|$", line)
        if m:
            rows[m.group(1)] = tuple(None if v == "—" else int(v.replace(",", "")) for v in m.groups()[1:])
    return rows


def test_the_docs_model_table_holds_every_built_in_model_with_its_parameter_count():
    rows = table()
    assert sorted(rows) == sorted(validation.MODELS)
    for name, (ten, hundred) in rows.items():
        assert sum(p.numel() for p in build(name).parameters()) == ten, name
        if hundred is not None:
            assert sum(p.numel() for p in build(name, 100).parameters()) == hundred, name


def test_resnet18_is_the_cifar_variant():
    m = build("resnet18").eval()
    assert sum(p.numel() for p in m.parameters()) == 11_173_962      # the standard CIFAR ResNet-18 figure
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    with torch.no_grad():
        assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resnets_are_refused_on_grayscale_data():
    with pytest.raises(ConfigError, match="resnet18 is for colour images"):
        config.load(None, ["model.name=resnet18", "data.dataset=mnist5k"])


def test_resnet18_has_the_cifar_stem_stages_and_projection_shortcuts():
    m = build("resnet18")
    assert (m.conv.in_channels, m.conv.out_channels, m.conv.kernel_size, m.conv.stride) == (3, 64, (3, 3), (1, 1))
    blocks = list(m.blocks)
    assert all(isinstance(b, models.ProjectionBlock) for b in blocks)
    stages = [(b.conv1.out_channels, b.conv1.stride[0]) for b in blocks]
    assert stages == [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]
    projected = [i for i, b in enumerate(blocks) if not isinstance(b.shortcut, nn.Identity)]
    assert projected == [2, 4, 6]       # where the shape changes: a 1x1 conv of the stride + BatchNorm
    for i in projected:
        conv, bn = blocks[i].shortcut
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.bias is None
        assert isinstance(bn, nn.BatchNorm2d)
    assert (m.fc.in_features, m.fc.out_features) == (512, 10)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert m.train()(x).shape == (2, 10)                # batch statistics
    with torch.no_grad():
        assert build("resnet18", 100).eval()(x).shape == (2, 100)


def test_resnet18_takes_its_input_channels_from_the_data_and_wants_images():
    cfg = config.load(None, ["model.name=resnet18", "data.dataset=cifar10"])
    m = models.build(cfg, (1, 28, 28), 10)
    assert m.conv.in_channels == 1
    with torch.no_grad():
        assert m.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match="model.name=resnet18") as e:
        models.build(cfg, (3072,), 10)
    assert "\n" not in str(e.value)


def test_resnet18_is_initialised_from_the_seed_alone():
    def at(seed):
        return models.build(config.load(None, ["model.name=resnet18", "data.dataset=cifar10", f"seed={seed}"]),
                            (3, 32, 32), 10)
    a, b = at(3), at(3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.conv.weight, at(4).conv.weight)


@pytest.mark.slow
def test_resnet18_vectorized_rows_equal_the_loops(monkeypatch):
    """As tests/test_workers.py's resnet20 case, smaller: 3 workers of 2 CIFAR-shaped images (one
    Byzantine on flipped labels) in chunks of 2, so the second chunk is padded. The vectorized
    path takes the model (probe finds nothing unsupported) and its gradients, per-worker BatchNorm
    buffers and losses are the loop's within float tolerance; the replica's buffers are untouched."""
    g = torch.Generator().manual_seed(0)
    tiny = data.Dataset(torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 10, (12,), generator=g),
                        torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g), 10)
    monkeypatch.setattr(data, "load", lambda cfg: tiny)
    args = [*TINY, "workers.n=3", "workers.byzantine=1", "attack.name=labelflip", "train.batch_size=2",
            "train.device=cpu", "model.name=resnet18", "data.dataset=cifar10", "workers.chunk=2",
            "resampling.name=none", "aggregator.allow_unsafe=true"]

    def trainer(vectorize):
        cfg = config.load(None, [*args, f"workers.vectorize={vectorize}"])
        return Trainer(cfg, distributed.setup(cfg))

    vec, loop = trainer("true"), trainer("false")
    assert vec.client.vectorized is not None and loop.client.vectorized is None
    assert vec.replica.nb > 0                                   # BatchNorm buffers travel in the rows
    for t in (vec, loop):
        t.client.compute_rows(0, attacks.byzantine_set(t.cfg, 0))
    assert vec.client.vectorized is not None                   # no fall back to the loop on the first call
    a, b, L = vec.client.rows, loop.client.rows, vec.layout
    assert a[:, L.vector].abs().sum(1).gt(0).all()
    assert torch.allclose(a[:, L.vector], b[:, L.vector], rtol=1e-4, atol=1e-6)
    assert torch.allclose(a[:, L.buffers], b[:, L.buffers], rtol=1e-5, atol=1e-6)
    assert torch.allclose(a[:, L.loss], b[:, L.loss], rtol=1e-5, atol=1e-6)
    for (_, got), (_, want) in zip(vec.model.named_buffers(), loop.model.named_buffers()):
        assert torch.equal(got, want)
