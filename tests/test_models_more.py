"""resnet18 (CIFAR variant) and the model table of docs/models.md, checked against the built models."""
import re

import pytest
import torch

from byzddp import config, models
from byzddp.config import ConfigError
from helpers import ROOT

SHAPES = {"mlp": (1, 28, 28), "cnn": (1, 28, 28), "cnn_relu": (1, 28, 28), "resnet20": (3, 32, 32),
          "resnet18": (3, 32, 32)}


def build(name, classes=10):
    extra = ["data.dataset=cifar10"] if name.startswith("resnet") else []
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
    assert sorted(rows) == sorted(config.MODELS)
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
