"""mda, smea, monna and caf against brute-force definitions written here (every subset through
itertools, covariances as d x d matrices, eigenpairs from torch.linalg on them), against ByzFL
0.0.11 where its definitions coincide, on non-finite rows, and their checks in validation."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

import byzfl
from byzddp import aggregators as A
from byzddp import config, pipeline
from byzddp.aggregators import subsets
from byzddp.config import ConfigError
from helpers import TINY
from test_aggregators import make_cfg


# ---------------------------------------------------------------------------- definitions

def mean_of(x, rows):
    return x[list(rows)].mean(dim=0)


def ref_mda(x, f):
    """(output, rows): the first subset of n-f rows, in itertools order, of smallest diameter."""
    x = x.double()
    best = None
    for s in itertools.combinations(range(len(x)), len(x) - f):
        diameter = max((float(torch.linalg.vector_norm(x[i] - x[j])) for i, j in itertools.combinations(s, 2)),
                       default=0.0)
        if best is None or diameter < best[0]:
            best = (diameter, s)
    return mean_of(x, best[1]), list(best[1])


def covariance(rows):
    y = rows - rows.mean(dim=0)
    return y.T @ y / len(rows)


def ref_smea(x, f):
    """(output, rows): the first subset of n-f rows whose d x d covariance has the smallest top eigenvalue."""
    x = x.double()
    best = None
    for s in itertools.combinations(range(len(x)), len(x) - f):
        top = float(torch.linalg.eigvalsh(covariance(x[list(s)]))[-1])
        if best is None or top < best[0]:
            best = (top, s)
    return mean_of(x, best[1]), list(best[1])


def ref_monna(x, f, designated=0):
    """(output, rows): the n-f rows nearest to row `designated`, by (distance, index)."""
    x = x.double()
    dist = [float(torch.linalg.vector_norm(x[i] - x[designated])) for i in range(len(x))]
    rows = sorted(range(len(x)), key=lambda i: (dist[i], i))[:len(x) - f]
    return mean_of(x, rows), rows


def ref_caf(x, f, threshold=None, tau_max_over="weighted", max_steps=10_000):
    """(output, steps). The filter on the rows themselves: weighted covariance as a d x d matrix,
    its top eigenvector by torch.linalg.eigh. tau_max_over="all" divides by the largest tau over
    every row (ByzFL), "weighted" over the rows still weighted (byzddp). None when the loop has
    not stopped after max_steps."""
    x = x.double()
    n = len(x)
    threshold = n - 2 * f if threshold is None else threshold
    c = torch.ones(n, dtype=torch.float64)
    best, best_mu, steps = math.inf, x.mean(dim=0), 0
    while c.sum() > threshold:
        if steps == max_steps:
            return None, steps
        steps += 1
        mu = (c[:, None] * x).sum(dim=0) / c.sum()
        y = x - mu
        cov = (c[:, None, None] * y[:, :, None] * y[:, None, :]).sum(dim=0) / c.sum()
        values, vectors = torch.linalg.eigh(cov)
        lam, v = float(values[-1]), vectors[:, -1]
        if lam < best:
            best, best_mu = lam, mu
        if lam <= 0:
            break
        tau = (y @ v) ** 2
        tau_max = tau[c > 0].max() if tau_max_over == "weighted" else tau.max()
        c = c * (1 - tau / tau_max)
    return best_mu, steps


REFS = {"mda": ref_mda, "smea": ref_smea, "monna": ref_monna}


def rows_with_outliers(n, d, seed, outliers=2, dtype=torch.float64):
    """Rows in clusters of different spread plus a few far ones: no ties, non-trivial choices."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 3 + 0.2
    x = torch.randn(n, 1, generator=g, dtype=torch.float64) + scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:outliers] += 20 * torch.randn(outliers, d, generator=g, dtype=torch.float64)
    return x[torch.randperm(n, generator=g)].to(dtype)


def close(a, b, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------- against the definitions

CASES = [(5, 1), (7, 2), (8, 3), (9, 2), (10, 4), (4, 0), (6, 5)]  # (6, 5): one row averaged


@pytest.mark.parametrize("name", ["mda", "smea", "monna"])
@pytest.mark.parametrize("n, f", CASES)
def test_subset_rules_equal_their_brute_force_definitions(name, n, f):
    for seed in range(3):
        x = rows_with_outliers(n, 6, seed, outliers=min(f, 2))
        rule = A.build(name, f=f)
        out = rule(x)
        want, rows = REFS[name](x, f)
        assert out.dtype == x.dtype and out.shape == (6,)
        close(out, want)
        assert rule.selected.tolist() == rows


@pytest.mark.parametrize("n, f, d", [(5, 1, 6), (7, 2, 6), (9, 4, 6), (10, 3, 6), (8, 2, 40), (11, 5, 3)])
def test_caf_equals_its_definition(n, f, d):
    for seed in range(3):
        x = rows_with_outliers(n, d, seed, outliers=min(f, 2))
        rule = A.build("caf", f=f)
        want, _ = ref_caf(x, f)
        close(rule(x), want)
        assert rule.selected is None


def test_monna_averages_around_the_designated_row():
    x = rows_with_outliers(9, 5, seed=4)
    for designated in (0, 3, 8):
        rule = A.build("monna", f=2, designated=designated)
        want, rows = ref_monna(x, 2, designated)
        close(rule(x), want)
        assert rule.selected.tolist() == rows and rows[0] == designated


def test_with_f_zero_every_rule_is_the_mean():
    x = rows_with_outliers(7, 4, seed=2)
    for name in ("mda", "smea", "monna", "caf"):
        close(A.build(name, f=0)(x), x.mean(dim=0), 1e-12)


def test_ties_go_to_the_lowest_index():
    # Points 0, 1, 2, 3 on a line, pairs kept: {0,1}, {1,2}, {2,3} all have diameter 1 and
    # variance 1/4; the first subset wins. MoNNA around row 1: rows 0 and 2 are equally near.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    for name in ("mda", "smea"):
        rule = A.build(name, f=2)
        assert rule(x).tolist() == [0.5, 0.0] and rule.selected.tolist() == [0, 1]
    rule = A.build("monna", f=2, designated=1)
    assert rule(x).tolist() == [0.5, 0.0] and rule.selected.tolist() == [1, 0]


def test_caf_on_equal_rows_stops_at_once():
    x = torch.tensor([[1.0, 2.0]] * 5 + [[50.0, -50.0]])
    assert A.build("caf", f=2)(x).tolist() == pytest.approx([1.0, 2.0])  # the outlier goes first
    assert A.build("caf", f=2)(torch.ones(6, 3)).tolist() == [1.0, 1.0, 1.0]


def test_smea_picks_by_eigenvalue_where_mda_picks_by_diameter():
    # Two far groups of 4: a tight segment with one far end (diameter 3, top eigenvalue about
    # 1.68) and a square of side 2.4 (diameter 3.39, top eigenvalue 2.4^2/4 = 1.44).
    x = torch.tensor([[0.0, 0.0], [0.01, 0.0], [0.02, 0.0], [3.0, 0.0], [20.0, 20.0],
                      [22.4, 20.0], [20.0, 22.4], [22.4, 22.4]], dtype=torch.float64)
    for name, rows in (("mda", [0, 1, 2, 3]), ("smea", [4, 5, 6, 7])):
        rule = A.build(name, f=4)
        want, ref_rows = REFS[name](x, 4)
        close(rule(x), want)
        assert rule.selected.tolist() == ref_rows == rows


# ---------------------------------------------------------------------------- against ByzFL

def byzfl_rows(n, d, seed, outliers):
    return rows_with_outliers(n, d, seed, outliers).numpy()  # float64 numpy: ByzFL keeps float64


def random_case(seed):
    g = np.random.default_rng(seed)
    n = int(g.integers(5, 11))
    return n, int(g.integers(1, (n - 1) // 2 + 1))


@pytest.mark.parametrize("name, cls", [("mda", byzfl.MDA), ("monna", byzfl.MoNNA)])
def test_mda_and_monna_agree_with_byzfl(name, cls):
    for seed in range(30):
        n, f = random_case(seed)
        x = byzfl_rows(n, 6, seed, outliers=min(f, 2))
        close(A.build(name, f=f)(torch.from_numpy(x)), cls(f)(x))
        # ByzFL casts torch input to float32: the same choice, float32 rounding.
        x32 = torch.from_numpy(x).float()
        close(A.build(name, f=f)(x32), cls(f)(x32), 1e-5)
    x = byzfl_rows(8, 4, 0, 2)
    close(A.build("monna", f=2, designated=5)(torch.from_numpy(x)), byzfl.MoNNA(2, idx=5)(x))


def test_smea_agrees_with_byzfl_in_one_dimension():
    # ByzFL estimates the top eigenvalue as ||Sigma v|| for one random unit vector v per subset:
    # lambda |e.v| on rank-one covariances, less than lambda in general, and a different random
    # factor for each subset. Only in one dimension (v = +-1) is it exact.
    for seed in range(30):
        n, f = random_case(seed)
        x = byzfl_rows(n, 1, seed, outliers=min(f, 2))
        close(A.build("smea", f=f)(torch.from_numpy(x)), byzfl.SMEA(f)(x))


def test_caf_agrees_with_byzfl_where_the_largest_tau_is_still_weighted():
    # ByzFL divides by the largest tau over all rows; byzddp over the rows still weighted (the
    # filter's definition: a row already at weight zero must not stall the others). One
    # dimension makes ByzFL's power step exact. Where the two filters' steps coincide the
    # outputs agree; where they part, ByzFL follows the all-rows reference. That one can run
    # for thousands of steps (it only shrinks weights geometrically): those cases are not run.
    same = differ = 0
    for seed in range(40):
        n, f = random_case(seed)
        x = torch.from_numpy(byzfl_rows(n, 1, seed, outliers=min(f, 2)))
        ours = A.build("caf", f=f)(x)
        weighted, _ = ref_caf(x, f, tau_max_over="weighted")
        close(ours, weighted)
        every, steps = ref_caf(x, f, tau_max_over="all", max_steps=60)
        if every is None:
            continue
        close(byzfl.CAF(f)(x.numpy()), every)
        if torch.allclose(every, weighted, rtol=1e-9, atol=1e-12):
            same += 1
            close(byzfl.CAF(f)(x.numpy()), ours)
        else:
            differ += 1
    assert same + differ >= 10 and same >= 1 and differ >= 1, (same, differ)  # 3 and 11 of 40


# ---------------------------------------------------------------------------- non-finite rows

BAD = {"nan": lambda d: torch.full((d,), math.nan), "+inf": lambda d: torch.full((d,), math.inf),
       "-inf": lambda d: torch.full((d,), -math.inf),
       "mixed": lambda d: torch.tensor([math.nan, math.inf, 1.0, -math.inf] * (d // 4))}


@pytest.mark.parametrize("kinds", [["nan"], ["nan", "+inf"], ["-inf", "mixed"], ["+inf", "+inf"]])
@pytest.mark.parametrize("name", ["mda", "smea", "monna", "caf"])
def test_up_to_f_bad_rows_never_reach_the_output(name, kinds):
    f, d = 2, 8
    honest = rows_with_outliers(8, d, seed=5, outliers=1)
    b = len(kinds)
    bad = torch.stack([BAD[k](d) for k in kinds]).double()
    for seed in range(3):
        # Bad rows anywhere but row 0 (MoNNA's designated worker).
        perm = torch.cat([torch.zeros(1, dtype=torch.long),
                          1 + torch.randperm(7 + b, generator=torch.Generator().manual_seed(seed))])
        x = torch.cat([honest, bad])[perm]
        good = perm < 8
        rule = A.build(name, f=f)
        out = rule(x)
        assert torch.isfinite(out).all()
        # Subsets (and neighbours) of the honest rows alone, with f - b of them left out; caf:
        # the bad rows weigh nothing from the start, the stop stays at m - 2f.
        h = x[good]
        want = ref_caf(h, f, threshold=len(x) - 2 * f)[0] if name == "caf" else REFS[name](h, f - b)[0]
        close(out, want)
        if rule.selected is not None:
            assert good[rule.selected].all()


@pytest.mark.parametrize("name", ["mda", "smea", "monna", "caf"])
def test_more_bad_rows_than_f_raise(name):
    x = rows_with_outliers(8, 4, seed=1)
    x[3], x[5] = math.nan, math.inf
    with pytest.raises(A.NonFiniteError, match=name):
        A.build(name, f=1)(x)


def test_monna_raises_when_the_designated_row_is_bad():
    x = rows_with_outliers(8, 4, seed=1)
    x[6] = math.nan
    assert torch.isfinite(A.build("monna", f=1, designated=0)(x)).all()
    with pytest.raises(A.NonFiniteError, match="monna"):
        A.build("monna", f=1, designated=6)(x)


def test_column_slices_give_the_whole_result(monkeypatch):
    from byzddp import geometry
    x = rows_with_outliers(9, 50, seed=3)
    x[2] = math.nan
    want = {n: A.build(n, f=2)(x) for n in ("mda", "smea", "monna", "caf")}
    monkeypatch.setattr(geometry, "grid_width", lambda d, device: 3)
    for name, w in want.items():
        close(A.build(name, f=2)(x), w, 1e-12)


# ---------------------------------------------------------------------------- validation



@pytest.mark.parametrize("name", ["mda", "smea", "monna", "caf"])
def test_an_honest_majority_is_required_after_pre_aggregation(name):
    # monna sees the workers' rows (m = 6, f' = 3); the others after s_replacement (s=2): m = 10, f' = 6.
    resampling, n, ok_n = ("none", 6, 7) if name == "monna" else ("s_replacement", 10, 13)
    pipeline.validate(make_cfg(name, resampling, n=ok_n, f=3))
    with pytest.raises(ConfigError, match=f"aggregator {name} needs 2f'\\+1 <= m") as info:
        pipeline.validate(make_cfg(name, resampling, n=n, f=3))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["mda", "smea"])
def test_too_many_subsets_is_refused_with_the_limit(name):
    assert subsets.MAX_SUBSETS == 100_000
    pipeline.validate(make_cfg(name, n=20, f=4))  # C(20, 16) = 4845
    with pytest.raises(ConfigError) as info:
        pipeline.validate(make_cfg(name, n=40, f=10, allow_unsafe=True))  # no flag lifts it
    msg = str(info.value)
    assert "\n" not in msg
    for w in ("workers.n", name, "m=40", "f=10", f"C(40, 30) = {math.comb(40, 30)}", "100000"):
        assert w in msg
    with pytest.raises(ValueError, match="100000"):
        A.build(name, f=10)(torch.randn(40, 3))


def load(*overrides):
    return config.load(None, ["workers.n=10", "workers.byzantine=2", "resampling.name=none",
                              "aggregator.name=monna", *overrides])


@pytest.mark.parametrize("overrides", [
    [], ["resampling.name=nnm"], ["resampling.name=arc"], ["resampling.name=clipping"], ["attack.name=bitflip", "aggregator.designated=7"],
    ["attack.name=none", "aggregator.designated=9"], ["attack.name=bitflip", "attack.count=0", "aggregator.designated=9"],
    ["attack.name=gaussian", "attack.rotate=true", "attack.count=0"],
])
def test_monna_accepts_an_honest_designated_worker(overrides):
    cfg = load(*overrides)
    assert pipeline.build(cfg).rule.designated == cfg.aggregator.designated


@pytest.mark.parametrize("overrides, words", [
    (["resampling.name=s_replacement"], ["resampling.name", "s_replacement", "resampling.name to one of none, nnm, arc, clipping"]),
    (["resampling.name=bucketing"], ["resampling.name", "bucketing"]),
    (["attack.name=bitflip", "aggregator.designated=8"], ["aggregator.designated", "worker 8 is Byzantine", "below 8"]),
    (["attack.name=bitflip", "attack.count=3", "aggregator.designated=7"], ["aggregator.designated", "below 7"]),
    (["attack.name=gaussian", "attack.rotate=true"], ["aggregator.designated", "attack.rotate=false"]),
    (["aggregator.designated=10"], ["aggregator.designated", "between 0 and 9"]),
    (["aggregator.designated=-1"], ["aggregator.designated", ">= 0"]),
    (["aggregator.designated=1.5"], ["aggregator.designated"]),
])
def test_monna_refuses_a_designated_worker_that_may_not_be_honest(overrides, words):
    with pytest.raises(ConfigError) as info:
        load(*overrides)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_other_rules_ignore_the_designated_worker():
    cfg = config.load(None, ["aggregator.name=mda", "attack.name=bitflip", "aggregator.designated=9"])
    assert pipeline.build(cfg).rule.name == "mda"


# ---------------------------------------------------------------------------- end to end

def test_each_rule_trains_through_train_py(tmp_path):
    from byzddp import cli
    for name in ("mda", "smea", "monna", "caf"):
        args = [*TINY, f"aggregator.name={name}", "resampling.name=none", "attack.name=bitflip",
                f"log.dir={tmp_path}", f"log.name={name}"]
        assert cli.main(args) == 0
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        counts = summary["selection_counts"]
        if name == "caf":
            assert counts is None
        else:  # 6 steps, 7 of 8 rows each
            assert sum(counts) == 6 * 7
        if name == "monna":
            assert counts[0] == 6  # the designated worker is always among its own nearest
