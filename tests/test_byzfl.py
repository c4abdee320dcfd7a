"""byzddp against ByzFL 0.0.11, an independent implementation (EPFL's byzfl; the dev extra pins
it), on the same random inputs with outliers and scaled rows, for every rule and pre-aggregation
both have: mean, cm, trimmed_mean, meamed, krum, multikrum, rfa, cclip, nnm, arc, clipping.
ByzFL has no Bulyan.

ByzFL takes numpy arrays (computed in float64) or torch tensors (cast to float32). We compare
both ways: float64 to 1e-9, float32 to float32 rounding. Where the two differ by design, a test
below pins the exact relation (docs/rules.md, "Definitions compared with ByzFL"):
  - Krum scores: ByzFL sums over the n-f-1 nearest others, the paper (and byzddp) over n-f-2,
    so byzddp krum(f) = ByzFL Krum(f+1); Multi-Krum likewise, byzddp multikrum(f-1, m=n-f) =
    ByzFL MultiKrum(f).
  - ARC's k: ByzFL computes int(2 f / n * (n - f)) in floats, one short where the exact
    product is a whole number the float lands under (n=242, f=33: 56, not 57).
  - torch inputs are cast to float32 (a float32 input is then the same tensor, which ARC and
    Clipping write into); byzddp keeps the dtype and never writes into its input.
  - Non-finite rows: ByzFL's GeometricMedian drops +-Inf rows but not NaN ones.
Not differences, though one might expect them: ByzFL 0.0.11's median is torch.quantile(0.5),
the mean of the two middle values for even n, as byzddp's cm and meamed (torch.median would
give the lower one); CenteredClipping starts from zero and carries its centre, as byzddp's cclip.
"""
import math

from importlib.metadata import version

import byzfl
import numpy as np
import pytest
import torch

from byzddp import aggregators as A
from byzddp import resampling as R, streams

CASES = [(7, 1), (9, 2), (10, 2), (11, 3), (12, 4), (16, 3), (20, 6), (25, 5)]


def inputs(n, f, seed=0, d=24):
    """Honest rows around a common mean with scales over a decade, then f outliers: a row scaled
    by 50, a row shifted by 30, a large flip of the mean, a wide Gaussian (in turn)."""
    g = torch.Generator().manual_seed(1000 * n + 10 * f + seed)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    scale = 10 ** (torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5)
    x = mu + torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    for j, i in enumerate(range(n - f, n)):
        kind = j % 4
        if kind == 0:
            x[i] = x[i] * 50
        elif kind == 1:
            x[i] = x[i] + 30
        elif kind == 2:
            x[i] = -20 * mu
        else:
            x[i] = torch.randn(d, generator=g, dtype=torch.float64) * 100
    return x


def gen():
    return streams.generator("resampling", 0, 0)


def rule(name, **p):
    return lambda x: A.build(name, **p)(x)


def pre(name, **p):
    return lambda x: R.build(name, **p)(x, gen())[0]


def median_norm(n, f):
    return float(inputs(n, f).norm(dim=1).median())


# name -> (ours(n, f), theirs(n, f)): the same definition on both sides.
PAIRS = {
    "mean": (lambda n, f: rule("mean"), lambda n, f: byzfl.Average()),
    "cm": (lambda n, f: rule("cm", f=f), lambda n, f: byzfl.Median()),
    "trimmed_mean": (lambda n, f: rule("trimmed_mean", f=f, b=f), lambda n, f: byzfl.TrMean(f)),
    "meamed": (lambda n, f: rule("meamed", f=f), lambda n, f: byzfl.Meamed(f)),
    "krum": (lambda n, f: rule("krum", f=f), lambda n, f: byzfl.Krum(f + 1)),
    "multikrum": (lambda n, f: rule("multikrum", f=f - 1, m=n - f), lambda n, f: byzfl.MultiKrum(f)),
    "rfa_T1": (lambda n, f: rule("rfa", f=f, T=1, nu=0.1), lambda n, f: byzfl.GeometricMedian(0.1, 1)),
    "rfa_T3": (lambda n, f: rule("rfa", f=f, T=3, nu=0.1), lambda n, f: byzfl.GeometricMedian(0.1, 3)),
    "rfa_T8_nu10": (lambda n, f: rule("rfa", f=f, T=8, nu=10.0), lambda n, f: byzfl.GeometricMedian(10.0, 8)),
    "nnm": (lambda n, f: pre("nnm", f=f), lambda n, f: byzfl.NNM(f)),
    "arc": (lambda n, f: pre("arc", f=f), lambda n, f: byzfl.ARC(f)),
    "clipping": (lambda n, f: pre("clipping", tau=median_norm(n, f)),
                 lambda n, f: byzfl.Clipping(median_norm(n, f))),
}


@pytest.mark.parametrize("n, f", CASES)
@pytest.mark.parametrize("name", PAIRS)
def test_the_same_definition_as_byzfl(name, n, f):
    ours, theirs = PAIRS[name][0](n, f), PAIRS[name][1](n, f)
    x = inputs(n, f)
    big = float(x.abs().max())
    # float64: ByzFL's numpy path (it works on a copy: ARC and Clipping write into their input)
    want = torch.from_numpy(np.asarray(theirs(x.numpy().copy())))
    got = ours(x)
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * big)
    # float32: ByzFL's torch path (a fresh instance: none of these keep state)
    x32 = x.float()
    torch.testing.assert_close(ours(x32), PAIRS[name][1](n, f)(x32.clone()), rtol=2e-5, atol=2e-6 * big)
    if name in ("arc", "clipping"):
        assert not torch.equal(want, x)   # something was clipped: the comparison says something


@pytest.mark.parametrize("n, f", CASES[:5])
@pytest.mark.parametrize("tau, L", [(1.0, 1), (5.0, 3), (100.0, 2)])
def test_centered_clipping_starts_from_zero_and_carries_its_centre_as_byzfl(n, f, tau, L):
    """Both start from a zero centre and carry the last output to the next call (ByzFL 0.0.11's
    `m` argument cannot set another start: any array raises TypeError, its check is inverted)."""
    ours = A.build("cclip", f=f, tau=tau, L=L)
    theirs = byzfl.CenteredClipping(tau=tau, L=L)
    for step in range(3):
        x = inputs(n, f, seed=step)
        torch.testing.assert_close(ours(x), torch.from_numpy(theirs(x.numpy().copy())),
                                   rtol=1e-9, atol=1e-12 * float(x.abs().max()))
    with pytest.raises(TypeError):
        byzfl.CenteredClipping(m=np.zeros(3))


# ---------------------------------------------------------------------------- pinned differences

def nearest_score_argsort(x, neighbours):
    """Brute force: each row's sum of squared distances to its `neighbours` nearest other rows,
    rows ranked by it (stable)."""
    n = x.shape[0]
    d2 = [[float(((x[i] - x[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    scores = [sum(sorted(d2[i][j] for j in range(n) if j != i)[:neighbours]) for i in range(n)]
    return sorted(range(n), key=lambda i: scores[i])


def test_byzfl_krum_counts_one_neighbour_more_so_its_f_is_ours_plus_one():
    """The paper's Krum scores a row by its n-f-2 nearest others; ByzFL's by its n-f-1
    (`sort(dist)[:, 1:n-f]`, the row itself first). So ByzFL Krum(f+1) is byzddp krum(f), and
    ByzFL MultiKrum(f), which averages n-f rows, is byzddp multikrum(f-1, m=n-f). Both read off
    brute-force scores here, and the same f on both sides does pick differently."""
    differ_krum = differ_multi = 0
    for n, f in CASES:
        for seed, outliers in ((0, f), (1, f), (2, 0), (3, 0)):   # with f outliers, and honest rows only
            x = inputs(n, outliers, seed=seed, d=6)
            ours = nearest_score_argsort(x, n - f - 2)
            theirs = nearest_score_argsort(x, n - f - 1)
            assert torch.equal(A.build("krum", f=f)(x), x[ours[0]])
            assert np.array_equal(byzfl.Krum(f)(x.numpy().copy()), x[theirs[0]].numpy())
            differ_krum += ours[0] != theirs[0]
            torch.testing.assert_close(torch.from_numpy(byzfl.MultiKrum(f)(x.numpy().copy())),
                                       x[sorted(theirs[:n - f])].mean(dim=0), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(A.build("multikrum", f=f)(x), x[sorted(ours[:n - f])].mean(dim=0),
                                       rtol=1e-12, atol=1e-12)
            differ_multi += set(ours[:n - f]) != set(theirs[:n - f])
    assert differ_krum >= 8 and differ_multi >= 2, (differ_krum, differ_multi)  # 11 and 2 of 32


def test_byzfl_arc_rounds_k_in_floats():
    """ARC clips k = floor(2 (f/n) (n-f)) rows. ByzFL computes int((2 * f / n) * (n - f)) in
    floats, which at n=242, f=33 gives 56.99999999999999 -> 56 where the exact value is 57 (8 such
    (n, f) below n=400). byzddp clips 57 rows, to the 58th largest norm; ByzFL 56, to the 57th."""
    n, f = 242, 33
    assert int((2 * f / n) * (n - f)) == 56 and (2 * f * (n - f)) // n == 57
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.linspace(1, 3, n, dtype=torch.float64)[:, None]
    norms = x.norm(dim=1)
    order = torch.argsort(norms, descending=True)
    ours = R.build("arc", f=f)(x, gen())[0]
    theirs = torch.from_numpy(byzfl.ARC(f)(x.numpy().copy()))
    changed = lambda out: int((out != x).any(dim=1).sum())  # noqa: E731
    assert changed(ours) == 57 and changed(theirs) == 56
    torch.testing.assert_close(ours[order[:57]].norm(dim=1), norms[order[57]].expand(57), rtol=1e-12, atol=0)
    torch.testing.assert_close(theirs[order[:56]].norm(dim=1), norms[order[56]].expand(56), rtol=1e-12, atol=0)
    for m, k in ((241, 33), (100, 10), (25, 5)):   # elsewhere the two agree
        y = x[:m]
        torch.testing.assert_close(R.build("arc", f=k)(y, gen())[0],
                                   torch.from_numpy(byzfl.ARC(k)(y.numpy().copy())), rtol=1e-12, atol=0)


def test_byzfl_casts_torch_inputs_to_float32_and_writes_into_them():
    """ByzFL's torch path runs on `vectors.float()`: a float64 tensor comes back float32, and a
    float32 one is the very tensor ARC and Clipping then clip in place. byzddp keeps the dtype
    and leaves its input alone."""
    x = inputs(10, 2)
    assert byzfl.Average()(x).dtype == torch.float32 and A.build("mean")(x).dtype == torch.float64
    assert byzfl.Median()(x).dtype == torch.float32 and A.build("cm")(x).dtype == torch.float64
    x32 = x.float()
    kept = x32.clone()
    for ours in (R.build("arc", f=2), R.build("clipping", tau=1.0)):
        assert ours(x32, gen())[0].dtype == torch.float32
        assert torch.equal(x32, kept)
    for theirs in (byzfl.ARC(2), byzfl.Clipping(1.0)):
        x32 = kept.clone()
        theirs(x32)
        assert not torch.equal(x32, kept)


def test_even_n_medians_are_the_mean_of_the_two_middle_values_in_both():
    """ByzFL 0.0.11's median is torch.quantile(q=0.5) (or numpy's median): the mean of the two
    middle values, as byzddp's cm and the median of its meamed; torch.median would give the lower.
    One column where that matters for Meamed too: [0, 1, 2, 5, 6, 7], f=2 keeps the 4 values
    nearest 3.5 ({1, 2, 5, 6}, mean 3.5); around the lower median 2 it would keep {0, 1, 2, 5}."""
    col = torch.tensor([[0.0], [1.0], [2.0], [5.0], [6.0], [7.0]], dtype=torch.float64)
    assert float(torch.median(col, dim=0).values) == 2.0
    for x in (col, col.float()):
        assert float(A.build("cm")(x)) == float(byzfl.Median()(x.clone())) == 3.5
        assert float(A.build("meamed", f=2)(x)) == float(byzfl.Meamed(2)(x.clone())) == 3.5
    assert float(byzfl.Meamed(2)(col.numpy().copy())[0]) == 3.5


def test_byzfl_geometric_median_drops_inf_rows_but_not_nan_rows():
    """byzddp's rfa gives every non-finite row weight zero. ByzFL drops rows holding +-Inf (its
    weights alpha = 1/n still count them, a constant that cancels), so with an Inf row the two
    agree; a NaN row makes ByzFL's output NaN, while byzddp's is the rows without it."""
    x = inputs(11, 3)
    rest = torch.arange(11) != 4
    bad = x.clone()
    bad[4, 2] = math.inf
    ours = A.build("rfa", f=3, T=3)(bad)
    torch.testing.assert_close(ours, torch.from_numpy(byzfl.GeometricMedian(0.1, 3)(bad.numpy().copy())),
                               rtol=1e-9, atol=1e-12)
    bad[4, 2] = math.nan
    assert np.isnan(byzfl.GeometricMedian(0.1, 3)(bad.numpy().copy())).all()
    torch.testing.assert_close(A.build("rfa", f=3, T=3)(bad), A.build("rfa", f=3, T=3)(x[rest]))
    assert torch.equal(A.build("rfa", f=3, T=3)(bad), ours)


def test_byzfl_has_no_bulyan():
    # So bulyan is checked against its definition alone (tests/test_aggregators.py).
    assert not hasattr(byzfl, "Bulyan") and version("byzfl") == "0.0.11"
