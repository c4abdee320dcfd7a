"""What every robust rule shares: the call contract, the non-finite check, state for checkpoints."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from byzddp.errors import NonFiniteError
from byzddp.geometry import Columns, all_finite, columns_of


def check_input(grads: Tensor, name: str) -> Tensor:
    if not isinstance(grads, Tensor) or grads.dim() != 2 or grads.shape[0] < 1:
        shape = tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__
        raise ValueError(f"aggregator {name}: expected an (m, d) tensor with m >= 1 rows, got {shape}")
    if not grads.is_floating_point():
        raise ValueError(f"aggregator {name}: expected a floating-point tensor, got {grads.dtype}")
    return grads


class Aggregator:
    """A robust rule: `rule(grads)` with grads (m, d) returns the (d,) aggregate and raises
    NonFiniteError rather than return a non-finite one (that check reads one flag from the
    device). `rule.aggregate(grads, columns)` is the same without the check, so without a host
    sync: the training step checks the update on the device itself; with a `Columns` plan it
    computes one rank's slice of the columns (`byzddp.sharded`).

    `selected` holds the row indices the last call picked (Krum, Multi-Krum, Bulyan), else None.
    """
    name = ""
    params: tuple = ()  # the parameters the rule takes besides f
    stateful = False  # whether the rule keeps state that `settle` must confirm
    draws = False  # takes the step's random stream: aggregate(..., generator=g) (dnc, signguard)
    trusted_root = False  # takes the server's root-set gradient: aggregate(..., root_gradient=g0) (fltrust)
    sharded = True  # computes a column slice from a `Columns` plan exactly (train.exchange=sharded)
    # Properties of `python -m byzddp.check` the rule does not have by design: key -> why
    # (keys: byzddp.check.PROPERTIES). The check prints the reason instead of failing.
    exempt: dict = {}

    def __init__(self, f: int = 0) -> None:
        self.f = f
        self.selected: Optional[Tensor] = None

    # ------------------------------------------------------------ from a config (byzddp.pipeline)

    @classmethod
    def resolve(cls, given: dict, m: int, fp: int) -> dict:
        """The constructor's keyword arguments when the rule sees m vectors with up to f' = fp
        Byzantine: f = fp, and the config's values `given` (those named in `params`; None means
        the default)."""
        return {"f": fp, **{k: v for k, v in given.items() if v is not None}}

    @classmethod
    def requirements(cls, m: int, fp: int, params: dict) -> list:
        """(holds, condition, numbers, fix or None) for each guarantee the rule needs of (m, f');
        `params` as `resolve` gave them. A failing one is refused unless aggregator.allow_unsafe."""
        return []

    @classmethod
    def impossible(cls, m: int, params: dict) -> Optional[tuple]:
        """(config key, message) when the rule cannot run at all on m vectors (no flag lifts
        that), else None."""
        return None

    @torch.no_grad()
    def __call__(self, grads: Tensor, **inputs) -> Tensor:
        out = self.aggregate(grads, **inputs)
        if not bool(all_finite(out)):
            raise NonFiniteError(self._non_finite_message(grads.shape[0]))
        return out

    @torch.no_grad()
    def aggregate(self, grads: Tensor, columns: Optional[Columns] = None) -> Tensor:
        x = check_input(grads, self.name)
        cols = columns_of(x, columns)
        self.selected = None
        out = self._aggregate(x, cols)
        if cols.is_whole and self.stateful:
            self.settle(all_finite(out))
        return out

    def settle(self, finite: Tensor) -> None:
        """Told (a device flag) whether the whole aggregate was finite; a slice's caller tells it
        after combining the slices. Stateful rules keep their new state only then."""

    def _aggregate(self, x: Tensor, cols: Columns) -> Tensor:
        raise NotImplementedError

    def _non_finite_message(self, m: int) -> str:
        return (f"aggregator {self.name}: the aggregate of {m} rows is not finite: more rows hold "
                f"NaN/Inf than the f={self.f} it tolerates; the update was not applied")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"aggregator {self.name} keeps no state, got keys {sorted(state)}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={getattr(self, k)}" for k in ("f", *self.params))
        return f"{self.name}({params})"


def honest_majority(m: int, fp: int) -> tuple:
    """The requirement 2f'+1 <= m, as `Aggregator.requirements` lists it."""
    return (2 * fp + 1 <= m, "2f'+1 <= m (an honest majority)", f"2*{fp}+1={2 * fp + 1} > {m}", None)
