"""The backdoor's pixel-pattern trigger and the attack success rate it is measured by.

The trigger is a square of `size` x `size` pixels in the bottom-right corner of an image, set
in every channel to that channel's largest value in the training set (white, in the
normalised data), as in the pixel-pattern backdoors of Bagdasaryan et al. (2020) and Sun et
al. (2019). The attack success rate is the share of test examples of other classes than the
target that the model classifies as the target once they carry the trigger. It is defined for
any run on images of at least `size` pixels a side whose classes include the target, so that
clean runs show the baseline a backdoor is measured against.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from byzddp.errors import ConfigError


def problem(shape, size: int, target: int, classes: int) -> Optional[Tuple[str, str]]:
    """(config key, why) a trigger of `size` pixels for class `target` cannot apply to examples
    of `shape` (without the batch dimension) and `classes` classes; None when it can."""
    if len(shape) != 3:
        return "attack.trigger_size", f"the examples have shape {tuple(shape)}, not images (channels, height, width)"
    if size > min(shape[1], shape[2]):
        return "attack.trigger_size", f"a {size}x{size} trigger does not fit {shape[1]}x{shape[2]} images"
    if not 0 <= target < classes:
        return "attack.target_class", f"target class {target} is not one of the {classes} classes"
    return None


class Trigger:
    def __init__(self, size: int, value: torch.Tensor, target: int):
        self.size, self.target = size, target
        self.value = value.view(-1, 1, 1)       # (C, 1, 1): each channel's white

    @classmethod
    def for_data(cls, train_x: torch.Tensor, classes: int, size: int, target: int) -> "Trigger":
        """The trigger for a dataset's training images; ConfigError (one line) when it cannot
        be stamped on them."""
        found = problem(train_x.shape[1:], size, target, classes)
        if found:
            key, why = found
            raise ConfigError(f"config key {key}: the backdoor's trigger cannot be stamped: {why}; use an image "
                              f"dataset, a smaller attack.trigger_size or a target class below {classes}")
        return cls(size, train_x.amax(dim=(0, 2, 3)), target)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of the images `x` (N, C, H, W) carrying the trigger."""
        out = x.clone()
        out[:, :, -self.size:, -self.size:] = self.value.to(out.dtype)
        return out

    def poison(self, x: torch.Tensor, y: torch.Tensor, fraction: float):
        """The batch with its first ceil(fraction * len) examples stamped and relabelled to the
        target (batches are drawn in random order, so these are a random share)."""
        k = min(len(y), math.ceil(fraction * len(y)))
        x, y = x.clone(), y.clone()
        x[:k] = self.stamp(x[:k])
        y[:k] = self.target
        return x, y

    @torch.no_grad()
    def hits(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(hits, count) as float64: of the examples not of the target class, how many the
        model classifies as the target once they carry the trigger."""
        keep = y != self.target
        if not bool(keep.any()):
            return torch.zeros(2, dtype=torch.float64, device=y.device)
        pred = model(self.stamp(x[keep])).argmax(1)
        return torch.stack([(pred == self.target).sum().double(), keep.sum().double()])
