"""Sharded aggregation (train.exchange=sharded) gives what gather mode gives, bit for bit.

In process: the columns of an (n, d) tensor cut into the slices of 1, 2 and 4 ranks, each slice
aggregated in its own thread (the per-chunk partials exchanged through a barrier, as the ranks
all-gather them), for every rule and pre-aggregation, against the whole tensor. Then a few
torchrun runs whose models equal gather mode's.
"""
import math
import threading

import pytest
import torch

from byzddp import aggregators as A
from byzddp import resampling as R
from byzddp import streams
from byzddp.aggregators import Columns
from byzddp.sharded import chunk_bounds
from helpers import TINY, summary, train

WIDTH = 3  # columns per chunk of the grid: 17 chunks over d = 50


class Barrier:
    """An all_gather among threads: every thread's tensor, in thread (rank) order."""

    def __init__(self, world):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)

    def all_gather(self, rank, t):
        self.slots[rank] = t
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


def on_slices(x, world, run):
    """run(slice, columns, gather_all) in one thread per rank; returns the per-rank results."""
    d = x.shape[1]
    bounds = chunk_bounds(-(-d // WIDTH), world)
    group, results, errors = Barrier(world), [None] * world, []

    def rank(r):
        try:
            first, last = bounds[r]
            cols = Columns(d, WIDTH, first, last, gather=lambda t, r=r: torch.cat(group.all_gather(r, t)))
            whole = lambda t, r=r: torch.cat(group.all_gather(r, t))  # noqa: E731
            results[r] = run(x[:, cols.start:cols.stop].contiguous(), cols, whole)
        except BaseException as e:  # a failing rank must not leave the others waiting
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def bits(t):
    return t.contiguous().view(torch.int32)


RULES = [("mean", {}), ("krum", {}), ("multikrum", {}), ("cm", {}), ("trimmed_mean", {"b": 2}),
         ("rfa", {"T": 3}), ("cclip", {"tau": 0.5, "L": 2}), ("bulyan", {"f": 1}), ("meamed", {}),
         ("mda", {}), ("smea", {}), ("monna", {"designated": 3}), ("caf", {})]


@pytest.mark.parametrize("resampler", R.NAMES)
@pytest.mark.parametrize("name, params", RULES, ids=[r[0] for r in RULES])
def test_every_slice_is_bit_for_bit_the_whole_result(name, params, resampler):
    g = torch.Generator().manual_seed(0)
    n, d = 11, 50
    x = (torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 3).float()
    if name != "mean":
        x[7] = math.nan    # the bad-row paths (mean would only give NaN)
    p = {"f": 2, **params}

    def run(rows, cols, whole_of):
        res, rule = R.build(resampler, s=2, f=2, seed=3), A.build(name, **p)
        outs, sel = [], []
        for step in range(2):  # twice: cclip carries its centre, fixed_groups its groups
            outputs, groups = res(rows, streams.generator("resampling", 0, step), cols)
            part = rule.aggregate(outputs, cols)
            update = whole_of(part)
            rule.settle(torch.isfinite(update).all())
            outs.append(update)
            sel.append(None if rule.selected is None else rule.selected.clone())
        return outs, sel

    want, want_sel = run(x, Columns(d, WIDTH), lambda t: t)
    for world in (1, 2, 4):
        for got, got_sel in on_slices(x, world, run):
            for a, b in zip(got, want):
                assert torch.equal(bits(a), bits(b)), (world, name, resampler)
            for a, b in zip(got_sel, want_sel):
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_slices_are_contiguous_balanced_runs_of_chunks():
    for chunks in (1, 5, 17, 64):
        for world in (1, 2, 3, 4, 8):
            b = chunk_bounds(chunks, world)
            assert b[0][0] == 0 and b[-1][1] == chunks
            assert all(b[r][1] == b[r + 1][0] for r in range(world - 1))
            sizes = [hi - lo for lo, hi in b]
            assert max(sizes) - min(sizes) <= 1


def test_the_column_grid_does_not_depend_on_the_world():
    # The grid is a function of d and the device type only: aligned chunks, about 16 of them
    # (so that slices balance), never more than 2^16 columns each on CPU.
    for d in (10, 5000, 12_730, 159_010, 1_200_000, 11_200_000):
        w = A.grid_width(d, torch.device("cpu"))
        assert w % 1024 == 0 and w <= 1 << 16
        assert -(-d // w) >= min(16, -(-d // 1024)) or w == 1 << 16


# ---------------------------------------------------------------------------- over torchrun

RUNS = [  # (name, ranks, overrides): representative rules with resampling
    ("cm", 2, ["aggregator.name=cm", "resampling.name=s_replacement", "workers.momentum=0.9"]),
    ("krum", 4, ["aggregator.name=krum", "resampling.name=bucketing", "workers.n=14",
                 "workers.byzantine=2", "attack.name=gaussian"]),
    ("rfa", 2, ["aggregator.name=rfa", "resampling.name=with_replacement", "aggregator.T=3"]),
    ("cclip", 4, ["aggregator.name=cclip", "resampling.name=nnm", "workers.n=10", "workers.byzantine=2",
                  "train.checkpoint_every=2", "train.keep_checkpoints=3"]),
]


@pytest.fixture(scope="module")
def gather_runs(tmp_path_factory):
    """Gather mode in one process (equal to 2 and 4 ranks, tests/test_harness.py)."""
    root = tmp_path_factory.mktemp("gather")
    for name, _, extra in RUNS:
        train([*TINY, *extra, f"log.dir={root}", f"log.name={name}"])
    return root


@pytest.mark.parametrize("name, ranks, extra", RUNS, ids=[r[0] for r in RUNS])
def test_sharded_runs_give_gather_modes_model(tmp_path, gather_runs, name, ranks, extra):
    train([*TINY, *extra, f"log.dir={tmp_path}", "log.name=s", "train.exchange=sharded"], nproc=ranks)
    got, want = summary(tmp_path / "s"), summary(gather_runs / name)
    assert got["world_size"] == ranks
    assert got["model_sha256"] == want["model_sha256"]
    assert got["selection_counts"] == want["selection_counts"]
    if name == "krum":
        assert sum(got["selection_counts"]) > 0
    if name == "cclip":
        # The centre, kept as slices, checkpoints whole; a sharded run resumes from it.
        ours = torch.load(tmp_path / "s" / "checkpoints" / "step_4.pt", weights_only=True)
        theirs = torch.load(gather_runs / name / "checkpoints" / "step_4.pt", weights_only=True)
        assert torch.equal(ours["aggregator"]["centre"], theirs["aggregator"]["centre"])
        train([*TINY, *extra, f"log.dir={tmp_path}", "log.name=r", "train.exchange=sharded",
               f"train.resume={tmp_path / 's' / 'checkpoints' / 'step_4.pt'}"], nproc=2)
        assert summary(tmp_path / "r")["model_sha256"] == want["model_sha256"]


def test_the_float64_cross_slice_quantities_are_bit_for_bit_the_whole_ones():
    # What the rules' choices rest on, before any rounding to float32: the Gram matrix, the
    # inner products with cclip's centre and ||centre||^2 (their partials summed in chunk order).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 50, generator=g) * 100
    centre = torch.randn(50, generator=g)

    def run(rows, cols, _):
        start, stop = cols.start, cols.stop
        gram, good, p, q = A.gram_matrix(rows, centre[start:stop], columns=cols)
        return torch.cat([gram.reshape(-1), p, q.reshape(1), good.double()])

    want = run(x, Columns(50, WIDTH), None)
    for world in (2, 4):
        for got in on_slices(x, world, run):
            assert torch.equal(got.view(torch.int64), want.view(torch.int64))


@pytest.mark.parametrize("n", [70, 200])  # the CPU's Gram panels: 2 and 4 of them
@pytest.mark.parametrize("name, params", [("krum", {}), ("rfa", {"T": 3}), ("cclip", {"tau": 0.5, "L": 2})])
def test_gram_panels_keep_every_slice_bit_for_bit(name, params, n):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(n, 50, generator=g) * torch.rand(n, 1, generator=g) * 3).float()
    x[n // 2] = math.nan

    def run(rows, cols, whole_of):
        rule = A.build(name, f=n // 5, **params)
        update = whole_of(rule.aggregate(rows, cols))
        return update, rule.selected

    want, want_sel = run(x, Columns(50, WIDTH), lambda t: t)
    for world in (2, 4):
        for got, got_sel in on_slices(x, world, run):
            assert torch.equal(bits(got), bits(want)), (world, name, n)
            assert (got_sel is None) == (want_sel is None) and (got_sel is None or torch.equal(got_sel, want_sel))
