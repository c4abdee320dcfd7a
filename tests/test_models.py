"""The models: `cnn` is the official code's MNIST network, layer for layer; `cnn_relu` is not."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from byzddp import config, models
from byzddp.config import ConfigError


def build(name, **over):
    cfg = config.load(None, [f"model.name={name}"] + [f"{k}={v}" for k, v in over.items()])
    return models.build(cfg, (1, 28, 28), 10)


def official_forward(m, x):
    """The official Net.forward (codes/tasks/mnist.py) written out with functional ops, eval mode."""
    x = F.relu(F.conv2d(x, m.conv1.weight, m.conv1.bias))
    x = F.conv2d(x, m.conv2.weight, m.conv2.bias)          # no ReLU here
    x = F.max_pool2d(x, 2).flatten(1)
    x = F.relu(F.linear(x, m.fc1.weight, m.fc1.bias))
    return F.log_softmax(F.linear(x, m.fc2.weight, m.fc2.bias), dim=1)


def test_cnn_is_the_official_network():
    m = build("cnn")
    layers = [(name, type(mod)) for name, mod in m.named_children()]
    assert layers == [("conv1", nn.Conv2d), ("conv2", nn.Conv2d), ("dropout1", nn.Dropout2d),
                      ("dropout2", nn.Dropout2d), ("fc1", nn.Linear), ("fc2", nn.Linear)]
    assert (m.dropout1.p, m.dropout2.p) == (0.25, 0.5)
    assert (m.conv1.in_channels, m.conv1.out_channels, m.conv1.kernel_size) == (1, 32, (3, 3))
    assert (m.conv2.in_channels, m.conv2.out_channels, m.conv2.kernel_size) == (32, 64, (3, 3))
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.out_features) == (9216, 128, 10)
    assert sum(p.numel() for p in m.parameters()) == 1_199_882
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    m.eval()
    with torch.no_grad():
        # logits to cross_entropy == the official log_softmax to nll_loss
        assert torch.allclose(F.log_softmax(m(x), 1), official_forward(m, x), atol=1e-5)


def test_cnn_has_no_relu_after_conv2_and_cnn_relu_has_one():
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    official, relu = build("cnn").eval(), build("cnn_relu").eval()
    relu.load_state_dict(official.state_dict())       # same weights, same layer names
    with torch.no_grad():
        pre_pool = official.conv2(F.relu(official.conv1(x)))
        assert (F.max_pool2d(pre_pool, 2) < 0).any()   # negatives reach fc1 in the official net
        assert not torch.allclose(official(x), relu(x), atol=1e-4)
    assert isinstance(relu.dropout1, nn.Dropout) and isinstance(relu.dropout2, nn.Dropout)


def test_cnn_dropout2d_zeroes_whole_channels_after_the_pool():
    m = build("cnn").train()
    seen = {}
    m.dropout1.register_forward_hook(lambda mod, inp, out: seen.update(out=out, inp=inp[0]))
    torch.manual_seed(0)
    m(torch.randn(8, 1, 28, 28))
    ratio = seen["out"] / seen["inp"]                   # 0 or 1/(1-p) per (example, channel)
    per_channel = ratio.flatten(2)
    assert torch.allclose(per_channel, per_channel[:, :, :1].expand_as(per_channel))
    kept = per_channel[:, :, 0]
    assert torch.all((kept == 0) | torch.isclose(kept, torch.tensor(1 / 0.75)))
    assert (kept == 0).any() and (kept != 0).any()


def test_cnn_needs_mnist_shaped_input():
    cfg = config.load(None, ["model.name=cnn"])
    with pytest.raises(ConfigError, match="model.name=cnn"):
        models.build(cfg, (3, 32, 32), 10)


def test_models_are_initialised_from_the_seed_alone():
    a, b = build("cnn", seed=3), build("cnn", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = build("cnn", seed=4)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)
