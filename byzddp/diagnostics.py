"""Per-round diagnostics of the server: how far the rule's output strayed from what the honest
workers agreed on, and which groups' vectors the rule kept. docs/diagnostics.md says how to
read them.

For a round with honest participants' vectors h_1..h_k (what they sent, worker momentum
included), their mean h̄ and the rule's output F (before the server's momentum):
    aggregation_error  ||F - h̄||²
    honest_variance    (1/k) Σ ||h_i - h̄||²
    kappa              aggregation_error / honest_variance: the empirical robustness
                       coefficient of (f, κ)-robustness (Allouah et al., AISTATS 2023)
    update_cosine      cos(F, h̄)
The sums run in float64 over the global column grid (byzddp/geometry.py), chunk by chunk, and
are added in chunk order: a rank's slice under train.exchange=sharded gives the same partials
as the whole rows, so the numbers are the same bits in every mode and on any number of ranks.

Selection rates, for rules that select (Krum, Multi-Krum, Bulyan, mda, smea, monna, dnc,
signguard; fltrust keeps the rows of positive trust; a plug-in sets `selected`): the share of
the round's Byzantine groups, and of its honest groups, among the rule's kept rows. After
pre-aggregation a row is a group of workers; a group counts as Byzantine when it holds a
Byzantine worker (without pre-aggregation each group is one worker).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from byzddp.geometry import Columns, columns_of

NAMES = ("aggregation_error", "honest_variance", "kappa", "update_cosine", "byzantine_in_round",
         "byzantine_selection_rate", "honest_selection_rate")


def sums(vectors: Tensor, update: Tensor, honest: List[int], columns: Optional[Columns] = None) -> Tensor:
    """[||F - h̄||², Σ_i ||h_i - h̄||², <F, h̄>, ||F||², ||h̄||²] in float64, over every column of
    the grid (a collective when `columns` holds a slice): `vectors` (m, columns) rows, `honest`
    their honest rows' indices, `update` the rule's output F on the same columns."""
    cols = columns_of(vectors, columns)
    partials = []
    for c in cols.chunks():
        # Row by row into fresh float64 buffers: every column's sum in the same order, whatever
        # the chunk's neighbours (the same bits for a slice as for the whole).
        mean = torch.zeros(c.stop - c.start, dtype=torch.float64, device=vectors.device)
        for i in honest:
            mean += vectors[i, c]
        mean /= len(honest)
        spread = torch.zeros((), dtype=torch.float64, device=vectors.device)
        for i in honest:
            spread += (vectors[i, c].double() - mean).square().sum()
        out = update[c].double()
        partials.append(torch.stack([(out - mean).square().sum(), spread, (out * mean).sum(),
                                     out.square().sum(), mean.square().sum()]))
    return cols.total(partials, torch.zeros(5, dtype=torch.float64, device=vectors.device))


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def of_round(totals: Tensor, honest: int, byzantine_in_round: int, selected: Optional[Tensor] = None,
             groups: Optional[List[Tensor]] = None, byzantine: Optional[List[int]] = None) -> dict:
    """The round's diagnostics from `sums`' totals (`honest`: how many honest vectors). A value
    that is not a finite number (an aggregate that is not finite, no spread among the honest
    vectors) is None; JSON has no NaN."""
    error, spread, dot, out_sq, mean_sq = totals.tolist()
    variance = spread / honest
    out = {"aggregation_error": _finite(error), "honest_variance": _finite(variance),
           "kappa": _finite(error / variance) if variance > 0 else None,
           "update_cosine": _finite(dot / math.sqrt(out_sq * mean_sq)) if out_sq > 0 and mean_sq > 0 else None,
           "byzantine_in_round": byzantine_in_round}
    if selected is not None and groups is not None:
        out.update(selection_rates(selected, groups, byzantine or []))
    return out


def selection_rates(selected: Tensor, groups: List[Tensor], byzantine: List[int]) -> dict:
    """The share of Byzantine and of honest groups among the kept rows `selected` (indices into
    `groups`, each group the workers behind a row; a row kept twice counts once). None for a
    side with no group this round."""
    bad = set(byzantine)
    kept = set(selected.tolist())
    is_byzantine = [any(w in bad for w in g.tolist()) for g in groups]
    rates = {}
    for key, side in (("byzantine_selection_rate", True), ("honest_selection_rate", False)):
        rows = [r for r, b in enumerate(is_byzantine) if b == side]
        rates[key] = sum(r in kept for r in rows) / len(rows) if rows else None
    return rates


class Record:
    """The diagnosed rounds: the mean of each value over the rounds since the last evaluation
    (what an evaluation line reports) and over the whole run (summary.json's mean_*). Values
    that were None in a round are left out of that value's means."""

    def __init__(self):
        self.window = {k: [0.0, 0] for k in NAMES}
        self.run = {k: [0.0, 0] for k in NAMES}

    def add(self, values: dict) -> None:
        for key, value in values.items():
            if value is None:
                continue
            for acc in (self.window, self.run):
                acc[key][0] += float(value)
                acc[key][1] += 1

    def since_last(self) -> dict:
        """The window's means, then a fresh window; keys with no value are left out."""
        out = {k: total / count for k, (total, count) in self.window.items() if count}
        self.window = {k: [0.0, 0] for k in NAMES}
        return out

    def run_means(self) -> dict:
        return {f"mean_{k}": (total / count if count else None) for k, (total, count) in self.run.items()}

    def state_dict(self) -> dict:
        return {"window": {k: list(v) for k, v in self.window.items()},
                "run": {k: list(v) for k, v in self.run.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.window = {k: list(state["window"].get(k, [0.0, 0])) for k in NAMES}
        self.run = {k: list(state["run"].get(k, [0.0, 0])) for k in NAMES}
