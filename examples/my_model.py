"""A plug-in model: `model.name=examples.my_model:small_cnn`.

byzddp calls the factory with the input's shape (C, H, W) and the number of classes, plus the
keywords of `model.args`, under the run's model-initialisation seed; it returns an nn.Module that
maps a batch (B, C, H, W) to logits (B, classes).

    python train.py model.name=examples.my_model:small_cnn model.args.width=16
"""
import torch.nn as nn


def small_cnn(input_shape, classes, width=8):
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(2 * width * 16, classes))
