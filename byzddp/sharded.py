"""Sharded aggregation (`train.exchange=sharded`): every rank aggregates a slice of the columns.

In gather mode rank 0 receives all n rows, runs the pre-aggregation and the rule, and
broadcasts the update. Here one all_to_all gives rank r columns slice r of every worker's row;
each rank runs the same pre-aggregation (groups keyed by (seed, step), so every rank draws the
same) and the same rule on its slice; the update slices are then all-gathered on every rank.
Rank 0 no longer holds every row: each rank holds O(n d / world) of them.

The slices follow the global column grid of `byzddp.geometry.Columns`: the grid depends on d
and the device type only, and rank r holds a contiguous run of its chunks. What spans columns
(the float64 Gram matrix of Krum, Multi-Krum, Bulyan, rfa's Weiszfeld distances, cclip's
distances to its centre, nnm's neighbours, arc's and clipping's row norms) is a sum of
per-chunk partials; the ranks all-gather their chunks' partials and add them in chunk order,
exactly as gather mode adds the same partials. So the model is bit-identical to gather mode's for every rule and pre-aggregation.

The [BatchNorm buffers | loss | stop] tail of every row, small, is all-gathered, so every rank
derives the same buffers (the first honest worker's), train loss and status that gather mode
broadcasts. cclip's centre is kept as slices; its state_dict gathers it whole.

The threat model is unchanged: Byzantine workers forge their vectors; the ranks aggregate their
slices faithfully, as the server does in gather mode.
"""
from __future__ import annotations

from typing import List

import torch

from byzddp import streams
from byzddp.geometry import Columns, all_finite, grid_width


def chunk_bounds(num_chunks: int, world: int) -> List[tuple]:
    """(first, last) chunks of each rank: contiguous runs, as even as possible."""
    return [(r * num_chunks // world, (r + 1) * num_chunks // world) for r in range(world)]


class ShardedRule:
    """The trainer's rule under sharded aggregation: the rule itself (it sees a slice), with a
    state_dict that holds cclip's whole centre (a collective: every rank calls it)."""

    def __init__(self, rule, server: "ShardedServer"):
        self.rule, self.server = rule, server

    def __getattr__(self, key):
        return getattr(self.rule, key)

    def state_dict(self) -> dict:
        state = self.rule.state_dict()
        if "centre" in state:
            state["centre"] = self.server.whole(state["centre"])
        return state

    def load_state_dict(self, state: dict) -> None:
        if "centre" in state:
            start, stop = self.server.ranges[self.server.topo.rank]
            state = dict(state, centre=state["centre"][start:stop])
        self.rule.load_state_dict(state)


class ShardedServer:
    """The server's pre-aggregation and rule on this rank's column slice (`server` is this rank's
    Server: its rule is wrapped so that cclip's sliced centre checkpoints whole)."""

    def __init__(self, server, exchange, topo):
        self.server, self.exchange, self.topo = server, exchange, topo
        d, world = server.replica.d, topo.world
        width = grid_width(d, server.device)
        num_chunks = -(-d // width)
        self.bounds = chunk_bounds(num_chunks, world)
        self.chunk_counts = [last - first for first, last in self.bounds]
        self.ranges = [(min(a * width, d), min(b * width, d)) for a, b in self.bounds]
        self.lengths = [b - a for a, b in self.ranges]
        first, last = self.bounds[topo.rank]
        self.columns = Columns(d, width, first, last, gather=self._partials_of_every_chunk)
        self.rule = server.aggregator
        server.aggregator = ShardedRule(self.rule, self)

    def _partials_of_every_chunk(self, mine: torch.Tensor) -> torch.Tensor:
        return self.exchange.all_gather_uneven(mine, self.chunk_counts)

    def whole(self, part: torch.Tensor, out=None) -> torch.Tensor:
        """This rank's slice of a d-vector -> the whole vector (into `out` if given), on every rank."""
        return self.exchange.all_gather_uneven(part, self.lengths, out)

    def step(self, rows: torch.Tensor, step: int, byzantine: List[int], participants: List[int],
             diagnose: bool = False) -> None:
        """The step's exchange and aggregation of this rank's `rows`; leaves the payload gather
        mode broadcasts (and, when `diagnose`, the round's diagnostics, on every rank)."""
        s = self.server
        L = s.layout
        mine = self.exchange.all_to_all_columns(rows[:, L.vector], self.ranges)   # (n, len_r)
        mine = s.taking_part(mine, participants)
        tails = self.exchange.all_gather(rows[:, L.tail].contiguous())           # (n, nb + 2)
        generator = streams.generator("resampling", s.cfg.seed, step)
        outputs, groups = s.resampler(mine, generator, self.columns)
        part = self.rule.aggregate(outputs, self.columns, **s.rule_inputs(step))
        s.check_output(part, outputs)
        update = self.whole(part, s.payload[L.update])
        self.rule.settle(all_finite(update))
        s.finish_payload(update, tails, groups, step, byzantine, participants)
        if diagnose:
            s.diagnose(mine, part, groups, byzantine, participants, self.columns)
