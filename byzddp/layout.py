"""The step's wire format, by name: where each piece sits in a worker's row and in the payload.

A rank sends one row per hosted worker,
    [ vector (d) | BatchNorm buffers after its forward (nb) | batch loss | stop request ]
and every rank gets back one payload,
    [ aggregated update (d) | buffers of the first honest worker (nb) | train loss | status ].
Both are float tensors of the same width d + nb + 2; `status` holds a `Status` code.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Status(IntEnum):
    """What the server says about a step, in the payload's last column."""
    OK = 0
    NONFINITE = 1   # the aggregate was not finite: it was not applied; the run stops, naming the step
    STOP = 2        # a rank asked to stop (a signal): every rank checkpoints at this step and exits


@dataclass(frozen=True)
class RowLayout:
    d: int      # model parameters: the vector's length
    nb: int     # BatchNorm buffer values

    @property
    def width(self) -> int:
        return self.d + self.nb + 2

    # -- a worker's row
    @property
    def vector(self) -> slice:
        return slice(0, self.d)

    @property
    def buffers(self) -> slice:
        return slice(self.d, self.d + self.nb)

    @property
    def loss(self) -> int:
        return self.d + self.nb

    @property
    def stop(self) -> int:
        return self.d + self.nb + 1

    @property
    def tail(self) -> slice:
        """[buffers | loss | stop]: laid out as RowLayout(0, nb) describes."""
        return slice(self.d, self.width)

    # -- the payload (same width; the update where the vector was)
    @property
    def update(self) -> slice:
        return self.vector

    @property
    def train_loss(self) -> int:
        return self.loss

    @property
    def status(self) -> int:
        return self.stop
