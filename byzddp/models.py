"""Models by name: mlp, cnn (the MNIST network of the paper's official code), cnn_relu (PyTorch's
MNIST example), resnet20 and resnet18 (CIFAR), gpt (characters, byzddp/gpt.py). docs/models.md
tabulates them."""
from __future__ import annotations

import warnings
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

# `cnn` applies nn.Dropout2d to a 2-D input as the official code does; torch warns on every such
# call that this is deprecated. The behaviour is the one wanted (see MnistCNN).
warnings.filterwarnings("ignore", message="dropout2d: Received a 2-D input")

from byzddp import plugins
from byzddp.errors import ConfigError


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: List[int], classes: int):
        super().__init__()
        sizes = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.out = nn.Linear(sizes[-1], classes)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


class MnistCNN(nn.Module):
    """`cnn`: the MNIST network of the paper's official code (epfml/byzantine-robust-noniid-optimizer,
    codes/tasks/mnist.py, class Net), layer for layer.

    conv 1->32 3x3, ReLU, conv 32->64 3x3 with NO ReLU, max-pool 2, Dropout2d(0.25), flatten,
    fc 9216->128, ReLU, Dropout2d(0.5), fc 128->10. It differs from PyTorch's MNIST example
    (`cnn_relu`) in the missing ReLU after conv2 and in nn.Dropout2d for both dropouts. The
    official forward ends in log_softmax and trains with nll_loss; returning the logits to
    cross_entropy gives the same loss, gradients and argmax.

    nn.Dropout2d in torch 2.x: after the pool, on (N, 64, 12, 12), it zeroes whole channels per
    example; on fc1's 2-D output (N, 128) it draws one mask entry per element, the same draws as
    nn.Dropout (and warns that 2-D input is deprecated; silenced below).
    """

    dropout = nn.Dropout2d        # both dropouts
    relu_after_conv2 = False

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = self.dropout(0.25)
        self.dropout2 = self.dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.conv2(x)
        x = F.max_pool2d(F.relu(x) if self.relu_after_conv2 else x, 2)
        x = self.dropout1(x).flatten(1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return self.fc2(x)


class MnistCNNReLU(MnistCNN):
    """`cnn_relu`: PyTorch's MNIST example network (a ReLU after conv2, element-wise dropout).
    Not the paper's network; kept because it trains better on non-iid shards without an attack."""

    dropout = nn.Dropout
    relu_after_conv2 = True


class ResidualPath(nn.Module):
    """The two 3x3 convolutions (each with its BatchNorm) of a ResNet basic block; the blocks
    below differ in their shortcut only."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def residual(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class BasicBlock(ResidualPath):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, stride)
        self.pad = cout - cin   # option A shortcut: subsample and zero-pad channels
        self.stride = stride

    def forward(self, x):
        out = self.residual(x)
        short = x
        if self.stride != 1 or self.pad:
            short = x[:, :, ::self.stride, ::self.stride]
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR (He et al. 2016, section 4.2): 3 stages of 3 blocks, 16/32/64 channels."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ProjectionBlock(ResidualPath):
    """ResNet's basic block with option B shortcuts: identity when the shape is kept, else a
    1x1 convolution of the block's stride and a BatchNorm (He et al. 2016, section 3.3)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, stride)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.residual(x) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant (as in kuangliu/pytorch-cifar and ByzFL): a 3x3 stride-1 stem of
    64 channels and no max-pool, 4 stages of 2 projection blocks, 64/128/256/512 channels with
    strides 1/2/2/2, global average pool, fc. 11,173,962 parameters for 10 classes. PyTorch's
    default initialisation, as in those implementations."""

    def __init__(self, classes: int = 10, channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for i in range(2):
                blocks.append(ProjectionBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _mlp(cfg, input_shape, classes):
    in_features = 1
    for s in input_shape:
        in_features *= s
    return MLP(in_features, list(cfg.model.hidden), classes)


def _mnist_cnn(cls):
    def build(cfg, input_shape, classes):
        if tuple(input_shape) != (1, 28, 28):
            raise ConfigError(f"model.name={cfg.model.name} is an MNIST CNN (1x28x28 input); use mlp or resnet20")
        return cls(classes)
    return build


def _resnet18(cfg, input_shape, classes):
    if len(input_shape) != 3:
        raise ConfigError(f"model.name=resnet18 takes images (C, H, W); this dataset's examples have "
                          f"shape {tuple(input_shape)}; use mlp")
    return ResNet18(classes, input_shape[0])


def _gpt(cfg, input_shape, classes):
    from byzddp.gpt import GPT
    m = cfg.model
    return GPT(classes, input_shape[0], m.width, m.depth, m.heads)


# The built-in models, each a builder (cfg, input_shape, classes) -> nn.Module; a plug-in is a
# factory(input_shape=..., classes=..., **model.args).
plugins.register(
    "model.name", "model", "factory",
    {"mlp": _mlp, "cnn": _mnist_cnn(MnistCNN), "cnn_relu": _mnist_cnn(MnistCNNReLU),
     "resnet20": lambda cfg, input_shape, classes: ResNet20(classes), "resnet18": _resnet18, "gpt": _gpt},
    "a callable that returns an nn.Module",
    lambda obj: callable(obj) and not (isinstance(obj, type) and not issubclass(obj, nn.Module)))


def plug_in(cfg):
    """The factory a plug-in model.name names (one ConfigError line if it is not callable)."""
    return plugins.resolve("model.name", cfg.model.name)


def validate(cfg) -> None:
    """A model name must resolve (a plug-in: import, be callable, take model.args' types);
    built-in models take no model.args."""
    plugins.check_args("model.name", cfg.model.name, cfg.model.args, plugins.resolve("model.name", cfg.model.name))


def build(cfg, input_shape, classes: int) -> nn.Module:
    """The model of `cfg.model`, initialised from the run's seed alone."""
    name = cfg.model.name
    from byzddp import streams
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(streams.key("model-init", cfg.seed))
        if plugins.is_path(name):
            return _plug_in_model(cfg, tuple(input_shape), classes)
        return plugins.resolve("model.name", name)(cfg, input_shape, classes)


def _plug_in_model(cfg, input_shape: tuple, classes: int) -> nn.Module:
    """factory(input_shape=..., classes=..., **model.args), under the run's model-init seed."""
    name = cfg.model.name
    model = plugins.call("model.name", name, plug_in(cfg), "input_shape, classes and model.args",
                         input_shape=input_shape, classes=classes, **cfg.model.args)
    if not isinstance(model, nn.Module):
        raise plugins.kind_error("model.name", name, "a factory of an nn.Module (it returned that)", model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"config key model.name: '{name}' gave a model with no trainable parameters; "
                          f"a factory must return an nn.Module with parameters to train")
    # One eval-mode forward of two examples (no dropout, BatchNorm statistics untouched): a model
    # that cannot take the data fails here in one line, not inside the first step.
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as e:
        raise ConfigError(f"config key model.name: '{name}' fails on a batch of shape {(2, *input_shape)}: "
                          f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"config key model.name: '{name}' maps a batch of shape {(2, *input_shape)} to "
                          f"{shape}; it must give logits of shape (2, {classes}), one row per example")
    return model
