"""Robust rules against brute-force float64 definitions, order invariance, f = 0, non-finite
rows, state, and the theory-aware validation of (m, f') after pre-aggregation."""
import math
import warnings

import pytest
import torch

from byzddp import aggregators as A
from byzddp import geometry
from byzddp.aggregators import sorting
from byzddp.aggregators.krum import krum_scores
from byzddp import config, pipeline
from byzddp.config import ConfigError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The rules with a reference definition here; the others have their own test files
# (test_subset_rules.py: mda, smea, monna, caf; test_filter_rules.py: dnc, signguard, fltrust).
TEXTBOOK_RULES = ["mean", "krum", "multikrum", "cm", "trimmed_mean", "rfa", "cclip", "bulyan", "meamed"]


# ---------------------------------------------------------------------------- textbook definitions
# Plain Python on lists of floats: loops over rows, pairs and coordinates, no torch.

def rows_of(x):
    return [[float(v) for v in row] for row in x.double().cpu()]


def sqdist(a, b):
    return math.fsum((p - q) ** 2 for p, q in zip(a, b))


def ref_krum_scores(rows, f, among=None):
    among = list(range(len(rows))) if among is None else among
    k = max(len(among) - f - 2, 1)  # documented: at least one neighbour (Bulyan's last round, f = 1)
    return {i: math.fsum(sorted(sqdist(rows[i], rows[j]) for j in among if j != i)[:k]) for i in among}


def ref_krum(rows, f):
    scores = ref_krum_scores(rows, f)
    best = min(scores, key=lambda i: (scores[i], i))
    return rows[best], [best]


def ref_multikrum(rows, f, m):
    scores = ref_krum_scores(rows, f)
    picked = sorted(scores, key=lambda i: (scores[i], i))[:m]
    return [math.fsum(rows[i][c] for i in picked) / m for c in range(len(rows[0]))], picked


def ref_median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def ref_cm(rows):
    return [ref_median([r[c] for r in rows]) for c in range(len(rows[0]))]


def ref_trimmed_mean(rows, b):
    n = len(rows)
    out = []
    for c in range(len(rows[0])):
        kept = sorted(r[c] for r in rows)[b:n - b]
        out.append(math.fsum(kept) / len(kept))
    return out


def ref_rfa(rows, T, nu):
    n, d = len(rows), len(rows[0])
    z = [0.0] * d
    for _ in range(T):
        beta = [(1 / n) / max(math.sqrt(sqdist(z, r)), nu) for r in rows]
        z = [math.fsum(b * r[c] for b, r in zip(beta, rows)) / math.fsum(beta) for c in range(d)]
    return z


def ref_cclip(rows, tau, L, centre):
    n, d = len(rows), len(rows[0])
    c = list(centre)
    for _ in range(L):
        steps = []
        for r in rows:
            v = [r[k] - c[k] for k in range(d)]
            norm = math.sqrt(math.fsum(x * x for x in v))
            scale = 1.0 if norm == 0 else min(1.0, tau / norm)
            steps.append([scale * x for x in v])
        c = [c[k] + math.fsum(s[k] for s in steps) / n for k in range(d)]
    return c


def ref_bulyan(rows, f):
    n, d = len(rows), len(rows[0])
    theta, left, picked = n - 2 * f, list(range(n)), []
    for _ in range(theta):
        scores = ref_krum_scores(rows, f, among=left)
        best = min(scores, key=lambda i: (scores[i], i))
        picked.append(best)
        left.remove(best)
    beta = theta - 2 * f
    out = []
    for c in range(d):
        values = [rows[i][c] for i in picked]
        med = ref_median(values)
        closest = sorted(values, key=lambda v: (abs(v - med), v))[:beta]  # ties: the smaller value
        out.append(math.fsum(closest) / beta)
    return out, picked


def reference(name, rows, f, **p):
    """(output, picked rows or None) of rule `name` by its textbook definition."""
    if name == "mean":
        return [math.fsum(col) / len(rows) for col in zip(*rows)], None
    if name == "krum":
        return ref_krum(rows, f)
    if name == "multikrum":
        return ref_multikrum(rows, f, p.get("m", len(rows) - f))
    if name == "cm":
        return ref_cm(rows), None
    if name == "trimmed_mean":
        return ref_trimmed_mean(rows, p.get("b", f)), None
    if name == "rfa":
        return ref_rfa(rows, p.get("T", 8), p.get("nu", 0.1)), None
    if name == "cclip":
        return ref_cclip(rows, p.get("tau", 10.0), p.get("L", 3), [0.0] * len(rows[0])), None
    if name == "bulyan":
        return ref_bulyan(rows, f)
    if name == "meamed":
        return ref_meamed(rows, f), None
    raise KeyError(name)


def spread_rows(n, d, seed, dtype=torch.float64):
    """Random rows in a few clusters of different spread: no ties, non-trivial choices."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 3 + 0.2
    centre = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return (centre + scale * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)


# (rule, n, f, params): inside each rule's theory, odd and even n.
CASES = [
    ("mean", 6, 0, {}), ("krum", 7, 2, {}), ("krum", 10, 3, {}), ("multikrum", 9, 2, {}),
    ("multikrum", 10, 2, {"m": 3}), ("cm", 7, 3, {}), ("cm", 10, 4, {}), ("trimmed_mean", 9, 2, {}),
    ("trimmed_mean", 10, 3, {"b": 4}), ("rfa", 8, 3, {"T": 1}), ("rfa", 9, 4, {"T": 8, "nu": 0.5}),
    ("cclip", 8, 2, {"tau": 0.7, "L": 1}), ("cclip", 9, 2, {"tau": 2.0, "L": 3}),
    ("bulyan", 11, 2, {}), ("bulyan", 16, 3, {}), ("bulyan", 7, 1, {}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, n, f, params", CASES)
def test_rule_equals_its_textbook_definition(name, n, f, params, device):
    for seed in range(3):
        x = spread_rows(n, 6, seed).to(device)
        rule = A.build(name, f=f, **params)
        out = rule(x)
        want, picked = reference(name, rows_of(x), f, **params)
        assert out.dtype == x.dtype and out.device == x.device and out.shape == (6,)
        torch.testing.assert_close(out.cpu(), torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-10)
        if picked is None:
            assert rule.selected is None
        else:
            assert rule.selected.tolist() == picked


# Bulyan's last Krum round runs on 2f+1 rows with f-1 neighbours: for f <= 2 that is one
# neighbour, and two mutual nearest rows always tie there (the lower index wins), so the choice
# depends on the order of the inputs. With f >= 3 no round is tied on generic inputs.
ORDER_CASES = [c for c in CASES if not (c[0] == "bulyan" and c[2] < 3)]


@pytest.mark.parametrize("name, n, f, params", ORDER_CASES)
def test_rule_is_invariant_to_the_order_of_its_inputs(name, n, f, params):
    x = spread_rows(n, 5, seed=7)
    rule = A.build(name, f=f, **params)
    out = rule(x)
    picked = None if rule.selected is None else sorted(rule.selected.tolist())
    for seed in range(3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        again = A.build(name, f=f, **params)
        torch.testing.assert_close(again(x[perm]), out, rtol=1e-12, atol=1e-12)
        if picked is not None:
            assert sorted(perm[again.selected].tolist()) == picked


def test_float32_output_matches_the_definition_and_keeps_dtype():
    x = spread_rows(11, 40, seed=3, dtype=torch.float32)
    for name in TEXTBOOK_RULES:
        out = A.build(name, f=2)(x)
        want, _ = reference(name, rows_of(x), 2)
        assert out.dtype == torch.float32
        want = torch.tensor(want, dtype=torch.float64)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_with_f_zero_the_rules_behave_as_documented():
    x = spread_rows(8, 5, seed=11)
    mean = x.mean(dim=0)
    # Multi-Krum with m = n, trimmed mean with b = 0 and Bulyan (theta = beta = n) are the mean.
    for name in ("multikrum", "trimmed_mean", "bulyan"):
        torch.testing.assert_close(A.build(name, f=0)(x), mean, rtol=1e-12, atol=1e-12)
    # Krum with f = 0 scores each row by its n-2 nearest; cclip with a huge radius is the mean after one step.
    want, picked = ref_krum(rows_of(x), 0)
    krum = A.build("krum", f=0)
    torch.testing.assert_close(krum(x), torch.tensor(want, dtype=torch.float64))
    assert krum.selected.tolist() == picked
    torch.testing.assert_close(A.build("cclip", tau=1e9, L=1)(x), mean, rtol=1e-12, atol=1e-12)
    # f does not enter cm, rfa and cclip.
    for name in ("cm", "rfa", "cclip"):
        torch.testing.assert_close(A.build(name, f=0)(x), A.build(name, f=3)(x))


def test_rfa_with_one_iteration_is_the_normalized_mean():
    x = spread_rows(9, 5, seed=2)
    norms = x.norm(dim=1).clamp_min(0.1)
    want = (x / norms[:, None]).sum(0) / (1 / norms).sum()
    torch.testing.assert_close(A.build("rfa", T=1)(x), want)


def test_the_network_gives_the_wanted_ranks_for_every_row_count(monkeypatch):
    """sorting.sorted_blocks on the CPU against torch.sort (NaN ranks as +Inf): every n from 1 to
    40 (padding blocks skipped), all ranks or a few wanted ones (the last merge keeps one side of
    a halving or both), ties, +-Inf and NaN (a NaN block is redone), in blocks of one column, of a
    few, and all at once."""
    g = torch.Generator().manual_seed(0)
    for n in range(1, 41):
        lo, hi = (n - 1) // 2, n // 2
        wanted_sets = [None, (lo, hi), (0,), (n - 1,), tuple(sorted({0, n // 3, n - 1}))]
        for kind in ("spread", "non-finite", "ties"):
            x = torch.randn(n, 23, generator=g)
            if kind == "non-finite":
                for value in (math.nan, math.inf, -math.inf):
                    x[torch.rand(n, 23, generator=g) < 0.1] = value
            elif kind == "ties":
                x = torch.randint(-2, 3, (n, 23), generator=g).float()
            want = torch.sort(torch.nan_to_num(x, nan=math.inf, posinf=math.inf, neginf=-math.inf), dim=0).values
            for block_bytes in (1, 64, 1 << 20):
                monkeypatch.setattr(sorting, "_NETWORK_BYTES", block_bytes)
                for wanted in wanted_sets:
                    seen = 0
                    for cols, s in sorting.sorted_blocks(x, None, wanted=wanted):
                        for r in range(n) if wanted is None else wanted:
                            assert torch.equal(s[r], want[r, cols]), (n, kind, block_bytes, wanted, r)
                        seen += cols.stop - cols.start
                    assert seen == 23


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", ["network", "sort transposed"])
def test_every_order_statistic_kernel_follows_the_definition(kernel, device, monkeypatch):
    # The rules sort with the min/max network or torch.sort per device type; force each one on
    # every device, with network blocks of a few columns (several blocks per chunk).
    monkeypatch.setattr(sorting, "_NETWORK_DEVICES", {"cpu", "cuda"} if kernel == "network" else set())
    monkeypatch.setattr(sorting, "_NETWORK_BYTES", 64)
    for n, b in ((7, 2), (8, 3), (2, 0), (1, 0), (17, 8), (32, 5)):
        x = spread_rows(n, 9, seed=n).to(device)
        for name, params in (("cm", {}), ("trimmed_mean", {"b": b})):
            want, _ = reference(name, rows_of(x), 0, **params)
            got = A.build(name, **params)(x).cpu()
            torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    x = spread_rows(11, 9, seed=3).to(device)
    want, _ = reference("bulyan", rows_of(x), 2)
    torch.testing.assert_close(A.build("bulyan", f=2)(x).cpu(), torch.tensor(want, dtype=torch.float64))
    honest = spread_rows(7, 8, seed=1)
    for kinds in (["nan", "nan"], ["nan", "-inf"], ["+inf", "-inf"], ["mixed", "mixed"]):
        x, _ = with_bad_rows(honest, kinds, seed=0)
        for name in ("cm", "trimmed_mean"):
            out = A.build(name, f=2)(x.to(device)).cpu()
            assert torch.isfinite(out).all() and inside_hull(out, honest)


@pytest.mark.parametrize("name", TEXTBOOK_RULES)
def test_column_chunks_do_not_change_the_result(name, monkeypatch):
    x = spread_rows(11, 50, seed=8)
    if name != "mean":
        x[4] = math.nan  # the bad-row paths too
    whole = A.build(name, f=2)
    want = whole(x)
    monkeypatch.setattr(geometry, "grid_width", lambda d, device: 3)  # 3 columns a chunk
    chunked = A.build(name, f=2)
    torch.testing.assert_close(chunked(x), want, rtol=1e-12, atol=1e-12)
    assert (whole.selected is None) == (chunked.selected is None)
    if whole.selected is not None:
        assert torch.equal(whole.selected, chunked.selected)


def test_even_median_averages_the_two_middle_values():
    x = torch.tensor([[1.0, -4.0], [7.0, 0.0], [3.0, 2.0], [10.0, 100.0]])
    assert A.build("cm")(x).tolist() == [5.0, 1.0]
    assert A.build("cm")(x[:3]).tolist() == [3.0, 0.0]


def test_ties_go_to_the_lowest_index():
    # f = 1, n = 5: each row scores its 2 nearest. Scores: rows 0 and 2 -> 0 + 4, row 1 -> 1 + 4,
    # row 3 -> 1 + 9, row 4 far away.
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0], [3.0, 0.0], [9.0, 9.0]])
    krum = A.build("krum", f=1)
    krum(x)
    assert krum.selected.tolist() == [0]  # rows 0 and 2 tie: the lower index wins
    multi = A.build("multikrum", f=1, m=3)
    multi(x)
    assert multi.selected.tolist() == [0, 2, 1]
    # Bulyan (n = 7, f = 1) keeps theta = 5 values 0, 1, 2, 3, 3 (median 2) and averages the
    # beta = 3 closest: 2, then two of 1, 3, 3 (all at distance 1): the smaller values win.
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [3.0], [100.0], [200.0]])
    bulyan = A.build("bulyan", f=1)
    assert bulyan(x).tolist() == [2.0]
    assert sorted(bulyan.selected.tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n", [1, 25, 64, 130, 200])
def test_the_gram_matrix_in_pieces_and_panels_is_symmetric_and_matches_one_matmul(n):
    # The CPU converts a chunk in pieces of columns and, from 64 rows, computes the upper
    # triangle in row panels, then mirrors it (from 64 rows 5,000 columns are several pieces).
    x = torch.randn(n, 5000, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    c = torch.randn(5000, generator=torch.Generator().manual_seed(1000 + n), dtype=torch.float64)
    got, good, xc, cc = geometry.gram_matrix(x, centre=c, columns=geometry.Columns(5000, 5000))
    assert good.all() and torch.equal(got, got.T)
    # Against single matmuls of the whole tensor (a different summation order).
    torch.testing.assert_close(got, x @ x.T, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(xc, x @ c, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(cc, c @ c, rtol=1e-12, atol=0)


def test_krum_distances_are_accurate_where_the_matmul_shortcut_is_not():
    # 40 rows (cdist switches to its matrix-multiply form above 25) with a large common offset.
    g = torch.Generator().manual_seed(0)
    x = (1000.0 + 1e-2 * torch.randn(40, 2000, generator=g)).float()
    dist, good = A.pairwise_squared_distances(x)
    exact = ((x.double()[:, None, :] - x.double()[None, :, :]) ** 2).sum(-1)
    assert good.all() and dist.dtype == torch.float64
    torch.testing.assert_close(dist, exact, rtol=1e-4, atol=0)
    # The float32 shortcut is off by far more than the spread itself.
    shortcut = torch.cdist(x, x, compute_mode="use_mm_for_euclid_dist") ** 2
    assert (shortcut.double() - exact).abs().max() > 10 * exact.max()


@pytest.mark.parametrize("name, params", [("rfa", {"T": 3, "nu": 1e-3}), ("cclip", {"tau": 0.05, "L": 3}),
                                          ("krum", {}), ("bulyan", {})])
def test_distance_based_rules_stay_exact_on_rows_far_from_the_origin(name, params):
    # 30 float32 rows at 1000 + 1e-2 noise: a float32 Gram matrix would lose every distance.
    g = torch.Generator().manual_seed(5)
    x = (1000.0 + 1e-2 * torch.randn(30, 300, generator=g)).float()
    want, picked = reference(name, rows_of(x), 3, **params)
    rule = A.build(name, f=3, **params)
    got = rule(x)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    if picked is not None:
        assert rule.selected.tolist() == picked


def test_krum_scores_are_sums_of_squared_distances():
    # Collinear points 0, 1, 3, 10 on a line, f = 0: each scores its 2 nearest squared distances.
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0]], dtype=torch.float64)
    krum = A.build("krum", f=0)
    krum(x)
    # scores: 0 -> 1 + 9 = 10; 1 -> 1 + 4 = 5; 3 -> 4 + 9 = 13; 10 -> 49 + 81 = 130
    assert krum.selected.tolist() == [1]
    scores = krum_scores(A.pairwise_squared_distances(x)[0], 0)
    assert scores.tolist() == [10.0, 5.0, 13.0, 130.0]


# ---------------------------------------------------------------------------- non-finite rows

BAD_KINDS = {
    "nan": lambda d: torch.full((d,), math.nan),
    "+inf": lambda d: torch.full((d,), math.inf),
    "-inf": lambda d: torch.full((d,), -math.inf),
    "huge": lambda d: torch.full((d,), 1e30),
    "-huge": lambda d: torch.full((d,), -1e30),
    "mixed": lambda d: torch.tensor([math.nan, math.inf, -math.inf, 1e30] * (d // 4)),
}


def with_bad_rows(honest, kinds, seed):
    """honest rows plus one bad row per entry of `kinds`, shuffled; returns (x, bad mask)."""
    d = honest.shape[1]
    bad = torch.stack([BAD_KINDS[k](d) for k in kinds]).to(honest.dtype)
    x = torch.cat([honest, bad])
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    mask = torch.cat([torch.zeros(len(honest), dtype=torch.bool), torch.ones(len(kinds), dtype=torch.bool)])
    return x[perm], mask[perm]


def inside_hull(out, honest, slack=1e-5):
    lo, hi = honest.min(dim=0).values, honest.max(dim=0).values
    width = (hi - lo).clamp_min(1.0) * slack
    return bool(((out >= lo - width) & (out <= hi + width)).all())


# Each rule on 11 rows with f = 2 (Bulyan's limit 4f+3 = 11), two bad rows of each kind.
KIND_SETS = [["nan", "nan"], ["+inf", "+inf"], ["-inf", "-inf"], ["huge", "huge"], ["-huge", "-huge"],
             ["nan", "-inf"], ["+inf", "-inf"], ["nan", "huge"], ["mixed", "mixed"]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kinds", KIND_SETS, ids=lambda k: "+".join(k))
@pytest.mark.parametrize("name", ["krum", "multikrum", "cm", "trimmed_mean", "bulyan"])
def test_selecting_and_order_rules_stay_inside_the_honest_hull(name, kinds, device):
    g = torch.Generator().manual_seed(1)
    honest = 3.0 + torch.randn(9, 16, generator=g)
    for seed in range(3):
        x, bad = with_bad_rows(honest, kinds, seed)
        rule = A.build(name, f=2)
        out = rule(x.to(device)).cpu()
        assert torch.isfinite(out).all()
        assert inside_hull(out, honest)
        if rule.selected is not None:
            picked = rule.selected.cpu()
            assert torch.isfinite(x[picked]).all()  # a non-finite row is never selected
            if name != "bulyan":
                # Krum's 8 neighbours always include honest rows, far from the huge ones. (Two
                # identical huge rows do win Bulyan's last Krum round, on one neighbour; its
                # coordinate-wise step then discards them, as the hull check shows.)
                assert not bad[picked].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kinds", KIND_SETS, ids=lambda k: "+".join(k))
def test_rfa_ignores_non_finite_rows_and_bounds_huge_ones(kinds, device):
    n_honest, f, T = 9, 2, 8
    g = torch.Generator().manual_seed(2)
    mu = torch.full((16,), 3.0, dtype=torch.float64)
    noise = torch.randn(n_honest, 16, generator=g, dtype=torch.float64)
    length = torch.rand(n_honest, 1, generator=g, dtype=torch.float64)
    honest = mu + noise / noise.norm(dim=1, keepdim=True) * length
    radius = (honest - mu).norm(dim=1).max()
    for seed in range(3):
        x, _ = with_bad_rows(honest, kinds, seed)
        out = A.build("rfa", f=f, T=T)(x.to(device)).cpu()
        assert torch.isfinite(out).all()
        if all(k in ("nan", "+inf", "-inf", "mixed") for k in kinds):
            # Weight zero: a convex combination of honest rows.
            assert inside_hull(out, honest, slack=1e-9)
        else:
            # Each Weiszfeld step is a convex combination of rows; a far row's weighted pull is
            # at most its weight 1/n, the honest weight at least (n-f)/n / (radius + error).
            # So error' <= radius + q (radius + error), q = f/(n-f), from error_0 = ||mu||.
            q = f / n_honest
            bound = mu.norm()
            for _ in range(T):
                bound = radius + q * (radius + bound)
            assert (out - mu).norm() <= bound * (1 + 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kinds", KIND_SETS, ids=lambda k: "+".join(k))
def test_cclip_clips_bad_rows_to_a_bounded_pull(kinds, device):
    # Honest rows within 0.6 of their mean mu, the centre starting at mu, tau = 1: the honest rows
    # are never clipped, a bad row pulls by at most tau/n per step, a non-finite one by nothing.
    # Then |c - mu| <= (f/n)|c - mu| + f tau/n each step, so |c - mu| < f tau / (n - f).
    n_honest, f, tau = 9, 2, 1.0
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(n_honest, 16, generator=g, dtype=torch.float64)
    length = 0.3 * torch.rand(n_honest, 1, generator=g, dtype=torch.float64)
    honest = 3.0 + noise / noise.norm(dim=1, keepdim=True) * length
    mu = honest.mean(dim=0)
    for seed in range(3):
        x, _ = with_bad_rows(honest, kinds, seed)
        rule = A.build("cclip", f=f, tau=tau, L=3)
        rule.load_state_dict({"centre": mu.to(device)})
        out = rule(x.to(device)).cpu()
        assert torch.isfinite(out).all()
        bound = 0.0 if all(k in ("nan", "+inf", "-inf", "mixed") for k in kinds) else f * tau / n_honest
        assert (out - mu).norm() <= bound + 1e-9
        # From a zero centre the output still is finite.
        assert torch.isfinite(A.build("cclip", f=f, tau=tau)(x.to(device))).all()


@pytest.mark.parametrize("name, params", [("rfa", {"T": 3}), ("cclip", {"tau": 1.0, "L": 2})])
def test_a_huge_finite_row_keeps_its_textbook_weight_in_float32(name, params):
    # Its squared distance overflows float32; the rule must still give it weight 1/||g - z||
    # (rfa) or clip it to length tau (cclip), not drop it.
    x = spread_rows(8, 6, seed=4, dtype=torch.float32)
    x[5] = torch.tensor([1e30, -1e30, 1e30, 0.0, 0.0, 1e30])
    want, _ = reference(name, rows_of(x), 2, **params)
    out = A.build(name, f=2, **params)(x)
    torch.testing.assert_close(out.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nan", "+inf", "-inf"])
def test_mean_fails_loudly_on_a_non_finite_row(kind):
    x = torch.randn(5, 8)
    x[3] = BAD_KINDS[kind](8)
    with pytest.raises(A.NonFiniteError, match="mean"):
        A.build("mean")(x)


@pytest.mark.parametrize("name", [r for r in TEXTBOOK_RULES if r != "cclip"])
def test_a_rule_refuses_to_return_a_non_finite_aggregate(name):
    x = torch.full((7, 4), math.nan)
    x[0] = 1.0
    with pytest.raises(A.NonFiniteError, match=name):
        A.build(name, f=1)(x[1:])  # every row NaN
    if name in ("cm", "trimmed_mean", "mean"):
        with pytest.raises(A.NonFiniteError, match=name):
            A.build(name, f=1)(x)  # more NaN rows than the rule tolerates


def test_cclip_with_only_bad_rows_keeps_its_centre():
    # Bad rows take a zero clipped step: with nothing finite the centre stays where it was.
    rule = A.build("cclip", f=1)
    rule.load_state_dict({"centre": torch.full((4,), 2.0)})
    assert rule(torch.full((6, 4), math.nan)).tolist() == [2.0] * 4


def test_rules_work_beyond_the_quantile_limit():
    # 3 x 2^23 entries: more than torch.quantile accepts (2^24).
    x = torch.randn(3, 1 << 23)
    x[1] = 5.0
    assert A.build("cm")(x).max().item() <= 5.0
    assert A.build("trimmed_mean", b=1)(x).max().item() <= 5.0


# ---------------------------------------------------------------------------- state, errors

def test_cclip_carries_its_centre_and_checkpoints_it():
    x1, x2 = spread_rows(8, 5, seed=1), spread_rows(8, 5, seed=2)
    rule = A.build("cclip", tau=0.5, L=2)
    assert rule.state_dict() == {}
    first = rule(x1)
    want = ref_cclip(rows_of(x1), 0.5, 2, [0.0] * 5)
    torch.testing.assert_close(first, torch.tensor(want, dtype=torch.float64))
    state = rule.state_dict()
    second = rule(x2)
    want = ref_cclip(rows_of(x2), 0.5, 2, first.tolist())  # the centre carried over
    torch.testing.assert_close(second, torch.tensor(want, dtype=torch.float64))
    resumed = A.build("cclip", tau=0.5, L=2)
    resumed.load_state_dict(state)
    assert torch.equal(resumed(x2), second)
    fresh = A.build("cclip", tau=0.5, L=2)
    assert not torch.equal(fresh(x2), second)


def test_stateless_rules_have_empty_state():
    for name in A.RULES:
        if name != "cclip":
            rule = A.build(name, f=1)
            assert rule.state_dict() == {}
            rule.load_state_dict({})


@pytest.mark.parametrize("name, params, words", [
    ("median", {}, ["unknown aggregator", "median"]),
    ("krum", {"tau": 1.0}, ["krum", "tau"]),
    ("rfa", {"T": 0}, ["rfa", "T", ">= 1"]),
    ("rfa", {"nu": -1.0}, ["nu", "positive"]),
    ("cclip", {"L": 1.5}, ["L", "integer"]),
    ("multikrum", {"f": -1}, ["f", ">= 0"]),
])
def test_build_refuses_bad_names_and_parameters(name, params, words):
    with pytest.raises(ConfigError) as info:
        A.build(name, **params)
    assert "\n" not in str(info.value)
    for w in words:
        assert w in str(info.value)


def test_bad_input_shape_is_refused():
    with pytest.raises(ValueError, match="tensor"):
        A.build("cm")(torch.randn(5))
    with pytest.raises(ValueError, match="floating"):
        A.build("cm")(torch.ones(3, 2, dtype=torch.long))


# ---------------------------------------------------------------------------- config: pipeline.validate, pipeline.build

def make_cfg(rule, resampling="none", s=2, n=10, f=2, **agg):
    cfg = config.Config()
    cfg.workers.n, cfg.workers.byzantine = n, f
    cfg.resampling.name, cfg.resampling.s = resampling, s
    cfg.aggregator.name = rule
    for key, value in agg.items():
        setattr(cfg.aggregator, key, value)
    return cfg


def test_krum_after_s_replacement_is_refused_with_the_numbers():
    cfg = make_cfg("krum", "s_replacement", s=2, n=10, f=2)
    with pytest.raises(ConfigError) as info:
        pipeline.validate(cfg)
    msg = str(info.value)
    assert "\n" not in msg
    for w in ["krum", "2f'+3 <= m", "s_replacement (s=2)", "m=10", "f'=4", "2*4+3=11 > 10",
              "workers.byzantine", "aggregator.allow_unsafe=true"]:
        assert w in msg


def test_allow_unsafe_turns_the_refusal_into_a_warning():
    cfg = make_cfg("krum", "s_replacement", s=2, n=10, f=2, allow_unsafe=True)
    with pytest.warns(UserWarning, match="2f'\\+3 <= m"):
        pipeline.validate(cfg)
    rule = pipeline.build(cfg).rule
    assert rule.f == 4
    assert torch.isfinite(rule(torch.randn(10, 3))).all()


@pytest.mark.parametrize("rule, resampling, s, n, f, ok", [
    ("krum", "s_replacement", 2, 11, 2, True),     # 2*4+3 = 11 <= 11 (the paper's 2sf+3 <= n)
    ("krum", "bucketing", 2, 10, 2, False),        # m = 5, f' = 2: 7 > 5
    ("krum", "bucketing", 2, 14, 2, True),         # m = 7, f' = 2
    ("krum", "s_replacement", 1, 7, 2, True),      # s = 1 is a shuffle: f' = f
    ("cm", "s_replacement", 2, 10, 2, True),       # 9 <= 10
    ("cm", "s_replacement", 3, 10, 2, False),      # f' = 6
    ("rfa", "with_replacement", 2, 9, 2, True),    # f' = min(4, 9)
    ("cclip", "none", 2, 4, 1, True),
    ("trimmed_mean", "s_replacement", 2, 10, 2, True),
    ("bulyan", "none", 2, 11, 2, True),
    ("bulyan", "none", 2, 10, 2, False),
    ("bulyan", "bucketing", 2, 22, 2, True),       # m = 11, f' = 2
    ("multikrum", "nnm", 2, 7, 2, True),
    ("mean", "s_replacement", 5, 10, 4, True),      # promises nothing, requires nothing
])
def test_validate_checks_the_rule_on_what_it_sees(rule, resampling, s, n, f, ok):
    cfg = make_cfg(rule, resampling, s=s, n=n, f=f)
    if ok:
        pipeline.validate(cfg)
    else:
        with pytest.raises(ConfigError, match=f"aggregator {rule} needs"):
            pipeline.validate(cfg)


def test_validate_refuses_parameters_outside_the_guarantee_and_impossible_ones():
    with pytest.raises(ConfigError, match="b >= f'.*raise aggregator.b to 4"):
        pipeline.validate(make_cfg("trimmed_mean", "s_replacement", n=10, f=2, b=1))
    with pytest.raises(ConfigError, match="aggregator.b"):  # trims everything: no flag helps
        pipeline.validate(make_cfg("trimmed_mean", "none", n=10, f=2, b=5, allow_unsafe=True))
    with pytest.raises(ConfigError, match="aggregator.m <= m-f'"):
        pipeline.validate(make_cfg("multikrum", "none", n=10, f=2, m=9))
    with pytest.raises(ConfigError, match="aggregator.m"):
        pipeline.validate(make_cfg("multikrum", "none", n=10, f=2, m=11, allow_unsafe=True))
    with pytest.raises(ConfigError, match="aggregator.name"):
        pipeline.validate(make_cfg("geomed"))
    with pytest.raises(ConfigError, match="aggregator.T"):
        pipeline.validate(make_cfg("rfa", T=0))


def test_pipeline_build_passes_f_prime_and_the_defaults():
    rule = pipeline.build(make_cfg("multikrum", "s_replacement", s=2, n=15, f=2)).rule
    assert (rule.f, rule.m) == (4, 11)
    rule = pipeline.build(make_cfg("trimmed_mean", "bucketing", s=2, n=10, f=2)).rule
    assert (rule.f, rule.b) == (2, 2)
    rule = pipeline.build(make_cfg("rfa", "none", T=3, nu=0.5)).rule
    assert (rule.f, rule.T, rule.nu) == (2, 3, 0.5)
    rule = pipeline.build(make_cfg("cclip", "nnm", tau=2.0, L=1)).rule
    assert (rule.f, rule.tau, rule.L) == (2, 2.0, 1)


def test_the_default_config_validates_quietly():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = config.load(None, [])
    assert pipeline.build(cfg).rule.name == cfg.aggregator.name


# ---------------------------------------------------------------------------- meamed

def ref_meamed(rows, f):
    n, out = len(rows), []
    for c in range(len(rows[0])):
        values = [r[c] for r in rows]
        med = ref_median(values)
        closest = sorted(values, key=lambda v: (abs(v - med), v))[:n - f]  # ties: the smaller value
        out.append(math.fsum(closest) / (n - f))
    return out


@pytest.mark.parametrize("n, f", [(7, 3), (10, 4), (9, 2), (6, 0)])
def test_meamed_equals_its_textbook_definition(n, f):
    for seed in range(3):
        x = spread_rows(n, 6, seed)
        want = torch.tensor(ref_meamed(rows_of(x), f), dtype=torch.float64)
        rule = A.build("meamed", f=f)
        torch.testing.assert_close(rule(x), want, rtol=1e-10, atol=1e-10)
        assert rule.selected is None


@pytest.mark.parametrize("kinds", KIND_SETS, ids=lambda k: "+".join(k))
def test_meamed_stays_inside_the_honest_hull(kinds):
    honest = 3.0 + torch.randn(9, 16, generator=torch.Generator().manual_seed(1))
    for seed in range(3):
        x, _ = with_bad_rows(honest, kinds, seed)
        out = A.build("meamed", f=2)(x)
        assert torch.isfinite(out).all() and inside_hull(out, honest)


def test_meamed_requires_an_honest_majority_after_pre_aggregation():
    pipeline.validate(make_cfg("meamed", "s_replacement", s=2, n=10, f=2))      # 2*4+1 = 9 <= 10
    with pytest.raises(ConfigError, match=r"aggregator meamed needs 2f'\+1 <= m.*2\*6\+1=13 > 10"):
        pipeline.validate(make_cfg("meamed", "s_replacement", s=3, n=10, f=2))
    assert pipeline.build(make_cfg("meamed", "s_replacement", n=10, f=2)).rule.f == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_is_the_elementwise_check_in_one_pass(dtype):
    """geometry.all_finite against torch.isfinite(t).all(): NaN, +-Inf (also +Inf and -Inf
    together, whose sum is NaN), the largest finite values (a float32 sum would overflow),
    empty and 0-d tensors."""
    from byzddp.geometry import all_finite
    big = torch.finfo(dtype).max
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(1000, generator=g).to(dtype), torch.full((4096,), big, dtype=dtype),
             torch.full((4096,), -big, dtype=dtype), torch.zeros(0, dtype=dtype), torch.tensor(1.5, dtype=dtype)]
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(1000, generator=g).to(dtype)
        t[int(torch.randint(0, 1000, (1,), generator=g))] = bad
        cases.append(t)
    both = torch.zeros(10, dtype=dtype)
    both[2], both[7] = float("inf"), -float("inf")
    cases.append(both)
    for t in cases:
        assert bool(all_finite(t)) == bool(torch.isfinite(t).all()), t
