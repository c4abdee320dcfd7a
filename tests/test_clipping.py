"""The clipping pre-aggregations: arc (adaptive robust clipping, Allouah et al. 2024) and
clipping (static, radius resampling.tau), against brute-force definitions written here, their
non-finite rows, float64 norms, composition with every rule, and config checks.
(ByzFL's ARC and Clipping: tests/test_byzfl.py; slices of the columns: tests/test_sharded.py.)"""
import math
from fractions import Fraction

import pytest
import torch

from byzddp import aggregators as A
from byzddp import clipping as C, config, pipeline, resampling as R, streams
from byzddp.aggregators import Columns
from byzddp.config import ConfigError


def gen(step=0):
    return streams.generator("resampling", 0, step)


def spread_rows(n, d, seed=0, dtype=torch.float32):
    """Rows of very different norms (a log-uniform scale over four decades), no two alike."""
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** (4 * torch.rand(n, 1, generator=g, dtype=torch.float64) - 2)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)


def norm_of(row):
    """Brute force: the Euclidean norm of one row, summed in Python in float64 (math.fsum)."""
    return math.sqrt(math.fsum(float(v) ** 2 for v in row.tolist()))


def brute_arc(x, f):
    """ARC by its definition: k = floor(2 (f/n) (n-f)) as an exact fraction; order the rows by
    norm, largest first; every row whose norm exceeds the (k+1)-th largest norm is scaled to that
    norm. Rows with non-finite entries count as infinitely large and are returned unchanged."""
    n = x.shape[0]
    k = math.floor(Fraction(2 * f, n) * (n - f))
    norms = [norm_of(r) if torch.isfinite(r).all() else math.inf for r in x]
    threshold = sorted(norms, reverse=True)[k] if k < n else math.inf
    out = x.clone()
    for i, v in enumerate(norms):
        if math.isfinite(v) and v > threshold:
            out[i] = (x[i].double() * (threshold / v)).to(x.dtype)
    return out, k, threshold


def brute_clip(x, tau):
    out = x.clone()
    for i, r in enumerate(x):
        if torch.isfinite(r).all() and norm_of(r) > tau:
            out[i] = (r.double() * (tau / norm_of(r))).to(x.dtype)
    return out


# ---------------------------------------------------------------------------- ARC

@pytest.mark.parametrize("n, f", [(5, 1), (7, 2), (10, 2), (10, 4), (11, 3), (16, 7), (25, 5), (40, 13)])
def test_arc_clips_the_k_largest_rows_to_the_next_norm(n, f):
    x = spread_rows(n, 37, seed=n * 100 + f)
    r = R.build("arc", f=f)
    out, groups = r(x, gen())
    want, k, threshold = brute_arc(x, f)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=0)
    assert [g.tolist() for g in groups] == [[i] for i in range(n)]
    assert r.num_outputs(n) == n and r.byzantine_outputs(n, f) == f
    before = torch.tensor([norm_of(v) for v in x])
    after = torch.tensor([norm_of(v) for v in out], dtype=torch.float64)
    top = torch.argsort(before, descending=True)[:k]
    assert k >= 1
    # The k largest now sit on the (k+1)-th largest norm, in their own directions ...
    torch.testing.assert_close(after[top], torch.full((k,), threshold, dtype=torch.float64), rtol=1e-6, atol=0)
    for i in top.tolist():
        cos = torch.nn.functional.cosine_similarity(out[i].double(), x[i].double(), dim=0)
        assert cos > 1 - 1e-6
    # ... and every other row is bit for bit what it was.
    rest = sorted(set(range(n)) - set(top.tolist()))
    assert torch.equal(out[rest], x[rest])


def test_arc_clips_exactly_floor_2f_over_n_times_n_minus_f_rows():
    for n in range(1, 260):
        for f in range(0, (n + 1) // 2):
            assert C.arc_count(n, f) == math.floor(Fraction(2 * f * (n - f), n)), (n, f)
    # The integer floor, not the float product: 2*33/242*209 = 56.99999999999999 in floats, 57 exactly.
    assert C.arc_count(242, 33) == 57 and int(2 * 33 / 242 * (242 - 33)) == 56


def test_arc_without_byzantine_workers_is_the_identity():
    x = spread_rows(9, 5)
    out, _ = R.build("arc", f=0)(x, gen())
    assert torch.equal(out, x)


def test_arc_leaves_a_row_tied_with_the_threshold_alone():
    # Rows 0 and 1 share the largest norm, n=5, f=1: k = 1, the threshold is row 1's (or 0's) norm.
    x = torch.tensor([[3.0, 4.0], [0.0, 5.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    out, _ = R.build("arc", f=1)(x, gen())
    assert torch.equal(out, x)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_row_stays_bad_and_counts_as_the_largest(bad):
    # n=10, f=2: k = 3. The bad row takes one of the three clipped places, as a huge finite row
    # would: the two largest finite rows are clipped to the third largest finite norm.
    x = spread_rows(10, 20, seed=4)
    x[6, 3] = bad
    out, _ = R.build("arc", f=2)(x, gen())
    assert torch.equal(out[6].isnan(), x[6].isnan()) and torch.equal(out[6].isinf(), x[6].isinf())
    assert torch.equal(out[6][torch.isfinite(x[6])], x[6][torch.isfinite(x[6])])
    assert torch.isfinite(out[torch.arange(10) != 6]).all()
    want, k, threshold = brute_arc(x, 2)
    assert k == 3 and math.isfinite(threshold)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=0, equal_nan=True)
    huge = x.clone()
    huge[6] = 1e30
    out_huge, _ = R.build("arc", f=2)(huge, gen())
    keep = torch.arange(10) != 6
    assert torch.equal(out_huge[keep], out[keep])


def test_more_bad_rows_than_clipped_places_leave_the_finite_rows_alone():
    x = spread_rows(10, 6, seed=2)     # k = 3 for f = 2; four bad rows: the threshold is +Inf
    x[[0, 3, 5, 8]] = math.nan
    out, _ = R.build("arc", f=2)(x, gen())
    good = torch.tensor([i not in (0, 3, 5, 8) for i in range(10)])
    assert torch.equal(out[good], x[good]) and out[~good].isnan().all()


def test_norms_are_float64_sums_a_float32_square_would_overflow():
    # ||row||^2 = 4e40 > float32's 3.4e38: as float32 the norm is Inf; in float64 it is 2e20 and
    # the row is a finite row like any other, clipped to a finite vector.
    x = spread_rows(6, 4, seed=1)
    x[2] = torch.tensor([1e20, 1e20, 1e20, 1e20])
    assert torch.isinf(x[2].norm())
    out, _ = R.build("arc", f=1)(x, gen())       # k = floor(2*5/6) = 1: only row 2 is clipped
    torch.testing.assert_close(out, brute_arc(x, 1)[0], rtol=1e-6, atol=0)
    assert torch.isfinite(out).all() and not torch.equal(out[2], x[2])
    out, _ = R.build("clipping", tau=3.0)(x, gen())
    torch.testing.assert_close(out, brute_clip(x, 3.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[2], torch.full((4,), 1.5), rtol=1e-6, atol=0)


def test_norms_span_the_column_plan():
    # Chunks of 3 columns: the same norms, the same outputs, as one plain call.
    x = spread_rows(8, 50, seed=9)
    for name in ("arc", "clipping"):
        r = R.build(name, f=2, tau=2.0)
        assert torch.equal(r(x, gen(), Columns(50, 3))[0], r(x, gen())[0])


# ---------------------------------------------------------------------------- static clipping

@pytest.mark.parametrize("tau", [0.05, 1.0, 10.0, 1e4])
def test_static_clipping_scales_every_row_above_tau_to_tau(tau):
    x = spread_rows(12, 30, seed=7)
    r = R.build("clipping", tau=tau)
    out, groups = r(x, gen())
    torch.testing.assert_close(out, brute_clip(x, tau), rtol=1e-6, atol=0)
    assert [g.tolist() for g in groups] == [[i] for i in range(12)] and r.byzantine_outputs(12, 2) == 2
    before = torch.tensor([norm_of(v) for v in x])
    after = torch.tensor([norm_of(v) for v in out])
    over = before > tau
    torch.testing.assert_close(after[over], torch.full((int(over.sum()),), tau), rtol=1e-6, atol=0)
    assert torch.equal(out[~over], x[~over])


def test_static_clipping_leaves_bad_rows_bad_and_the_rest_clipped():
    x = spread_rows(7, 9, seed=3, dtype=torch.float64)
    x[1] = math.inf
    x[4, 0] = math.nan
    out, _ = R.build("clipping", tau=0.5)(x, gen())
    assert out[1].isinf().all() and out[4, 0].isnan()
    good = torch.tensor([i not in (1, 4) for i in range(7)])
    torch.testing.assert_close(out[good], brute_clip(x, 0.5)[good], rtol=1e-12, atol=0)
    assert out.dtype == torch.float64


# ---------------------------------------------------------------------------- with every rule

@pytest.mark.parametrize("pre", ["arc", "clipping"])
@pytest.mark.parametrize("rule", A.RULES)
def test_every_rule_runs_after_clipping_and_keeps_the_bad_rows_out(rule, pre):
    n, f = 11, 2
    cfg = config.Config()
    cfg.workers.n, cfg.workers.byzantine = n, f
    cfg.resampling.name, cfg.aggregator.name = pre, rule
    p = pipeline.validate(cfg)
    assert (p.m, p.fp) == (n, f)
    x = spread_rows(n, 16, seed=5)
    x[3] = 1e6                      # a huge outlier: clipped
    if rule != "mean":
        x[8] = math.nan             # a bad row: the rule's business
    out, _ = p.pre(x, gen())
    # fltrust's root gradient: here the mean of rows that are neither the outlier nor the bad row
    inputs = {"root_gradient": x[:3].mean(dim=0)} if p.rule.trusted_root else {}
    agg = p.rule(out, **inputs)
    assert agg.shape == (16,) and torch.isfinite(agg).all()
    if rule == "mean":
        # The mean of the clipped rows: the outlier arrives with its norm cut down.
        torch.testing.assert_close(agg, out.mean(dim=0))
        assert agg.norm() < x[3].norm() / n


# ---------------------------------------------------------------------------- config

def test_tau_is_a_config_key_that_clipping_uses():
    cfg = config.load(None, ["resampling.name=clipping", "resampling.tau=0.25"])
    pre = pipeline.build(cfg).pre
    assert pre.tau == 0.25 and repr(pre) == "clipping(tau=0.25)"
    assert config.Config().resampling.tau == R.TAU == 10.0


@pytest.mark.parametrize("name, tau", [("clipping", 0.0), ("clipping", -1.0), ("arc", -2.0)])
def test_a_radius_that_is_not_positive_is_one_line(name, tau):
    with pytest.raises(ConfigError) as info:
        config.load(None, [f"resampling.name={name}", f"resampling.tau={tau}"])
    msg = str(info.value)
    assert "\n" not in msg and "resampling.tau" in msg and "positive" in msg
    with pytest.raises(ConfigError, match="resampling.tau"):
        R.build("clipping", tau=float("nan"))


def test_arc_and_clipping_ignore_s_and_are_told_f():
    # No groups: any s passes; f' = f, so Krum's 2f'+3 <= m is checked on n itself.
    for name in ("arc", "clipping"):
        R.check(name, 50, 10, 2)
        cfg = config.Config()
        cfg.workers.n, cfg.workers.byzantine = 6, 2
        cfg.resampling.name, cfg.aggregator.name = name, "krum"
        with pytest.raises(ConfigError, match=f"after {name}.*m=6.*f'=2"):
            pipeline.validate(cfg)
