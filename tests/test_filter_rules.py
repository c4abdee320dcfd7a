"""dnc, signguard and fltrust (byzddp/aggregators/filters.py) against brute-force definitions
written here (torch.linalg.svd on the subsampled rows, plain-Python mean shift and sums), their
properties (outliers removed, order of the inputs, non-finite rows), the config checks, the draws
keyed by (seed, step), column slices, and the trainer's inputs (fltrust's root gradient, also over
1 and 2 ranks)."""
import copy
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from byzddp import aggregators as A
from byzddp import config, data, pipeline, streams
from byzddp.aggregators import Columns
from byzddp.config import ConfigError
from helpers import TINY, summary, train
from test_sharded import WIDTH, bits, on_slices

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------- brute-force definitions

def draw(seed, step, d, k, times):
    """The documented draws: `times` subsets of k of d coordinates, randperm(d)[:k] sorted, one
    after the other from the stream ("aggregator", seed, step); every coordinate when k >= d."""
    g = streams.generator("aggregator", seed, step)
    return [list(range(d)) if k >= d else sorted(torch.randperm(d, generator=g)[:k].tolist()) for _ in range(times)]


def finite_rows(x):
    return [i for i in range(x.shape[0]) if bool(torch.isfinite(x[i]).all())]


def ref_dnc(x, f, niters=5, b=10000, c=1.0, seed=0, step=0, with_times=False):
    """(output, kept rows): per subset, the centred good rows' squared projections on the top
    right-singular vector (torch.linalg.svd), the m - floor(c f) lowest kept (ties: lowest index)."""
    n, d = x.shape
    good = finite_rows(x)
    keep = n - math.floor(c * f)
    times = {i: 0 for i in good}
    for idx in draw(seed, step, d, b, niters):
        sub = x[good][:, idx].double()
        centred = sub - sub.mean(dim=0)
        v = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        score = {i: float(s) for i, s in zip(good, (centred @ v) ** 2)}
        for i in sorted(good, key=lambda i: (score[i], i))[:keep]:
            times[i] += 1
    # the rows kept every time; if none, those kept most often
    kept = sorted(i for i in good if times[i] == max(times.values()))
    if with_times:
        return x[kept].double().mean(dim=0), kept, times
    return x[kept].double().mean(dim=0), kept


def ref_largest_cluster(points):
    """The documented flat-kernel mean shift on a list of tuples: indices of the largest cluster."""
    k = len(points)
    nth = max(int(k * 0.5), 1)
    h = math.fsum(sorted(math.dist(p, q) for q in points)[nth - 1] for p in points) / k
    modes, counts = [], []
    for p in points:
        y, count = p, 0
        for _ in range(300):
            within = [q for q in points if math.dist(y, q) <= h]
            count = len(within)
            new = tuple(math.fsum(q[j] for q in within) / count for j in range(len(p)))
            moved, y = math.dist(new, y), new
            if moved <= 1e-3 * h:
                break
        modes.append(y)
        counts.append(count)
    taken = []
    for i in sorted(range(k), key=lambda i: (-counts[i], i)):
        if all(math.dist(modes[i], modes[j]) > h for j in taken):
            taken.append(i)
    label = [min(range(len(taken)), key=lambda t: (math.dist(p, modes[taken[t]]), t)) for p in points]
    sizes = [label.count(t) for t in range(len(taken))]
    best = sizes.index(max(sizes))
    return [i for i in range(k) if label[i] == best]


def ref_signguard(x, low=0.1, high=3.0, fraction=0.1, seed=0, step=0):
    n, d = x.shape
    rows = [[float(v) for v in r] for r in x.double()]
    good = finite_rows(x)
    norm = {i: math.sqrt(math.fsum(v * v for v in rows[i])) for i in good}
    M = statistics.median(norm[i] for i in good)
    by_norm = {i for i in good if low * M <= norm[i] <= high * M}
    k = max(1, int(fraction * d))
    idx = draw(seed, step, d, k, 1)[0]
    feats = [tuple(sum(1 for j in idx if test(rows[i][j])) / k
                   for test in (lambda v: v > 0, lambda v: v == 0, lambda v: v < 0)) for i in good]
    by_sign = {good[t] for t in ref_largest_cluster(feats)}
    S = sorted(by_norm & by_sign) or sorted(by_norm)    # disjoint sets: the norm filter's rows
    out = [math.fsum(rows[i][j] * min(1.0, M / norm[i]) for i in S) / len(S) for j in range(d)]
    return torch.tensor(out, dtype=torch.float64), S


def ref_fltrust(x, g0):
    rows = [[float(v) for v in r] for r in x.double()]
    r0 = [float(v) for v in g0.double()]
    n0 = math.sqrt(math.fsum(v * v for v in r0))
    total, acc = 0.0, [0.0] * len(r0)
    terms = [[] for _ in r0]
    trusts = []
    for i in finite_rows(x):
        ni = math.sqrt(math.fsum(v * v for v in rows[i]))
        cos = math.fsum(a * b for a, b in zip(rows[i], r0)) / (ni * n0) if ni * n0 > 0 else 0.0
        ts = max(cos, 0.0)
        trusts.append(ts)
        if ts > 0:
            for j, v in enumerate(rows[i]):
                terms[j].append(ts * v * n0 / ni)
    total = math.fsum(trusts)
    acc = [math.fsum(t) / total if total > 0 else 0.0 for t in terms]
    return torch.tensor(acc, dtype=torch.float64)


def rows_with_outliers(n, d, bad, seed, shift=6.0):
    """n - bad honest rows around a common mean, and `bad` rows moved together along one direction
    (far enough to be found, not by norm alone)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5
    direction = torch.randn(d, generator=g, dtype=torch.float64)
    x[n - bad:] = x[:n - bad].mean(0) + shift * direction / direction.norm() * math.sqrt(d) / 4 \
        + 0.1 * torch.randn(bad, d, generator=g, dtype=torch.float64)
    return x


# ---------------------------------------------------------------------------- against the definitions

DNC_CASES = [(10, 2, {"niters": 5, "b": 30}), (12, 3, {"niters": 3, "b": 200}),   # b >= d: every coordinate
             (11, 2, {"niters": 4, "b": 17, "c": 1.5}), (9, 2, {"niters": 2, "b": 25, "c": 0.5})]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, f, params", DNC_CASES)
def test_dnc_equals_its_definition(n, f, params, device):
    for seed, step in ((0, 0), (3, 7), (5, 11)):
        x = rows_with_outliers(n, 60, f, seed=seed + step)
        rule = A.build("dnc", f=f, **params)
        out = rule(x.to(device), generator=streams.generator("aggregator", seed, step))
        want, kept = ref_dnc(x, f, seed=seed, step=step, **params)
        assert rule.selected.tolist() == kept and out.device.type == device
        torch.testing.assert_close(out.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [{}, {"norm_low": 0.5, "norm_high": 1.5, "sign_fraction": 0.3},
                                    {"sign_fraction": 1.0}])
def test_signguard_equals_its_definition(params, device):
    for seed, step in ((0, 0), (2, 5), (4, 9)):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(11, 200, generator=g, dtype=torch.float64) * torch.rand(11, 1, generator=g, dtype=torch.float64)
        x += 0.3 * torch.randn(200, generator=g, dtype=torch.float64)
        x[:, ::7] = 0.0          # some zero coordinates, as ReLU nets give
        x[9] = x[9].abs() * 2    # all signs positive
        x[10] *= 40              # a huge norm
        rule = A.build("signguard", f=2, **params)
        out = rule(x.to(device), generator=streams.generator("aggregator", seed, step))
        want, S = ref_signguard(x, params.get("norm_low", 0.1), params.get("norm_high", 3.0),
                                params.get("sign_fraction", 0.1), seed, step)
        assert rule.selected.tolist() == S and out.device.type == device
        torch.testing.assert_close(out.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_fltrust_equals_its_definition(device):
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(9, 40, generator=g, dtype=torch.float64) + 0.3 * torch.arange(9.0, dtype=torch.float64)[:, None]
        x[2] = 0.0
        g0 = torch.randn(40, generator=g, dtype=torch.float64) + 1.0
        x[5] = -3 * g0           # opposite: no trust
        rule = A.build("fltrust", f=3)
        out = rule(x.to(device), root_gradient=g0.to(device))
        torch.testing.assert_close(out.cpu(), ref_fltrust(x, g0), rtol=1e-12, atol=1e-12)
        trusted = [i for i in range(9) if float(x[i] @ g0) > 0]     # positive cosine: positive trust
        assert rule.selected.tolist() == trusted and 2 not in trusted and 5 not in trusted


def test_float32_rows_give_float32_aggregates_close_to_the_definitions():
    x = rows_with_outliers(10, 60, 2, seed=1)
    x32 = x.float()
    gen = lambda: streams.generator("aggregator", 1, 2)  # noqa: E731
    out = A.build("dnc", f=2, b=30)(x32, generator=gen())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_dnc(x32.double(), 2, b=30, seed=1, step=2)[0], rtol=1e-5, atol=1e-5)
    out = A.build("fltrust", f=2)(x32, root_gradient=x32[0])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_fltrust(x32.double(), x32[0].double()), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- properties

def test_dnc_removes_rows_moved_along_one_direction():
    for seed in range(4):
        x = rows_with_outliers(12, 80, 3, seed=seed)
        rule = A.build("dnc", f=3, b=40)
        rule(x, generator=streams.generator("aggregator", seed, 0))
        assert set(rule.selected.tolist()) <= set(range(9))


def test_signguard_drops_huge_tiny_and_sign_skewed_rows_and_clips_to_the_median():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 300, generator=g, dtype=torch.float64)
    x[8] *= 10       # norm 10x the median: above norm_high = 3
    x[9] *= 0.01     # below norm_low = 0.1
    x[10] = x[10].abs()                 # every sign positive, norm unchanged
    x[11] = -x[11].abs()                # every sign negative
    rule = A.build("signguard", f=4, sign_fraction=0.5)
    out = rule(x, generator=streams.generator("aggregator", 0, 0))
    assert rule.selected.tolist() == list(range(8))
    norms = x.norm(dim=1)
    M = norms.sort().values[5:7].mean()   # 12 rows: the mean of the two middle ones
    want = (x[:8] * (M / norms[:8]).clamp(max=1)[:, None]).mean(0)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_fltrust_ignores_distrusted_rows_and_the_scale_of_trusted_ones():
    g = torch.Generator().manual_seed(1)
    g0 = torch.randn(50, generator=g, dtype=torch.float64)
    honest = g0 + 0.8 * torch.randn(6, 50, generator=g, dtype=torch.float64)
    rule = A.build("fltrust", f=4)
    want = rule(honest, root_gradient=g0)
    attacked = torch.cat([honest, -5 * honest[:3], torch.zeros(1, 50, dtype=torch.float64)])
    attacked[:6] *= torch.tensor([1.0, 7.0, 0.1, 3.0, 1.0, 100.0], dtype=torch.float64)[:, None]
    assert all(float(r @ g0) < 0 for r in -5 * honest[:3])   # the bitflipped rows point away from g0
    torch.testing.assert_close(rule(attacked, root_gradient=g0), want, rtol=1e-12, atol=1e-12)
    assert float(want.norm()) <= float(g0.norm()) * (1 + 1e-12)   # a mean of vectors of norm ||g0||


@pytest.mark.parametrize("name", ["dnc", "signguard", "fltrust"])
def test_the_order_of_the_inputs_permutes_the_selection_only(name):
    x = rows_with_outliers(11, 70, 2, seed=4)
    x[3] *= 9
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    inputs = (lambda: {"root_gradient": x[0] + 0.1}) if name == "fltrust" else \
        (lambda: {"generator": streams.generator("aggregator", 2, 3)})
    a, b = (A.build(name, f=2, b=35) if name == "dnc" else A.build(name, f=2) for _ in range(2))
    out_a, out_b = a(x, **inputs()), b(x[perm], **inputs())
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-10)
    if a.selected is not None:
        assert sorted(perm[b.selected].tolist()) == a.selected.tolist()


BAD = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@pytest.mark.parametrize("kind", BAD)
def test_non_finite_rows_never_reach_the_output(kind):
    x = rows_with_outliers(11, 60, 2, seed=6)
    bad = x.clone()
    bad[4, 7] = BAD[kind]
    bad[8] = BAD[kind]
    keep = [i for i in range(11) if i not in (4, 8)]
    gen = lambda: streams.generator("aggregator", 1, 1)  # noqa: E731
    # dnc with c = 1 keeps m - f rows: on the finite rows that is dnc with f - 2
    rule = A.build("dnc", f=3, b=30)
    want = A.build("dnc", f=1, b=30)(bad[keep], generator=gen())
    torch.testing.assert_close(rule(bad, generator=gen()), want, rtol=1e-12, atol=1e-12)
    assert 4 not in rule.selected.tolist() and 8 not in rule.selected.tolist()
    # signguard and fltrust on the finite rows alone (the same coordinates: the draw depends on d)
    rule = A.build("signguard", f=2)
    want = A.build("signguard", f=2)(bad[keep], generator=gen())
    torch.testing.assert_close(rule(bad, generator=gen()), want, rtol=1e-12, atol=1e-12)
    assert 4 not in rule.selected.tolist() and 8 not in rule.selected.tolist()
    g0 = x[0] + 0.2
    torch.testing.assert_close(A.build("fltrust", f=2)(bad, root_gradient=g0),
                               A.build("fltrust", f=2)(bad[keep], root_gradient=g0), rtol=1e-12, atol=1e-12)


def test_no_finite_row_or_no_selection_raises_non_finite_error():
    x = torch.full((6, 20), math.nan, dtype=torch.float64)
    for name in ("dnc", "signguard"):
        with pytest.raises(A.NonFiniteError, match=name):
            A.build(name, f=1)(x)
    g0 = torch.ones(20, dtype=torch.float64)
    with pytest.raises(A.NonFiniteError, match="fltrust"):
        A.build("fltrust", f=1)(torch.ones(6, 20, dtype=torch.float64), root_gradient=g0 * math.nan)
    # fltrust trusting no row takes no step (the documented zero), it does not stop the run
    out = A.build("fltrust", f=1)(-torch.ones(6, 20, dtype=torch.float64), root_gradient=g0)
    assert torch.equal(out, torch.zeros(20, dtype=torch.float64))
    with pytest.raises(ValueError, match="root gradient"):
        A.build("fltrust", f=1)(torch.ones(6, 20))


def test_dnc_with_an_empty_intersection_averages_the_rows_kept_most_often():
    # keep m - c f = 1 row per iteration: different subsets pick different rows, so no row is
    # kept every time; the output is the mean of the rows kept in the most iterations.
    x = torch.randn(4, 400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rule = A.build("dnc", f=1, c=3.0, b=5, niters=10)
    out = rule(x, generator=streams.generator("aggregator", 0, 0))
    want, kept, times = ref_dnc(x, 1, niters=10, b=5, c=3.0, with_times=True)
    assert max(times.values()) < 10            # the paper's intersection is empty here
    assert kept and rule.selected.tolist() == kept
    torch.testing.assert_close(out, want)


def test_signguard_averages_the_norm_filters_rows_when_the_sign_cluster_misses_them():
    # Five rows as after bucketing: the largest sign cluster is two rows of huge norm, outside
    # [0.1, 3] x the median norm; the intersection is empty, so the norm filter's rows count.
    d = 200
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    x[3] = x[4] = 100.0 * torch.ones(d, dtype=torch.float64)
    x[4, 0] = 101.0
    want, S = ref_signguard(x, fraction=1.0)
    norm = x.norm(dim=1)
    assert S == [i for i in range(5) if 0.1 * norm.median() <= norm[i] <= 3 * norm.median()] == [0, 1, 2]
    rule = A.build("signguard", f=1, sign_fraction=1.0)
    torch.testing.assert_close(rule(x, generator=streams.generator("aggregator", 0, 0)), want)
    assert rule.selected.tolist() == S


# ---------------------------------------------------------------------------- (seed, step) and slices

def test_draws_are_keyed_by_seed_and_step():
    # no outliers and few coordinates per draw: which rows pass depends on the draw
    x = torch.randn(10, 400, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for name, params in (("dnc", {"b": 5, "niters": 1}), ("signguard", {"sign_fraction": 0.01})):
        outs = {}
        for seed, step in ((0, 0), (0, 1), (1, 0), (0, 0)):
            out = A.build(name, f=2, **params)(x, generator=streams.generator("aggregator", seed, step))
            if (seed, step) in outs:
                assert torch.equal(out, outs[(seed, step)])   # the same key: the same bits
            outs[(seed, step)] = out
        assert len({tuple(o.tolist()) for o in outs.values()}) == 3, name
        # a library call without a generator draws as the trainer's seed 0, step 0
        assert torch.equal(A.build(name, f=2, **params)(x), outs[(0, 0)])


@pytest.mark.parametrize("name, params", [("dnc", {"b": 13, "niters": 3}), ("signguard", {"sign_fraction": 0.3}),
                                          ("fltrust", {})])
def test_every_slice_is_bit_for_bit_the_whole_result(name, params):
    g = torch.Generator().manual_seed(0)
    n, d = 11, 50
    x = (torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 3).float()
    x[7, 40] = math.nan   # a bad row whose NaN only one rank holds
    x[2] *= 20
    g0 = torch.randn(d, generator=g)

    def run(rows, cols, whole_of):
        rule = A.build(name, f=2, **params)
        outs, sel = [], []
        for step in range(2):
            inputs = ({"root_gradient": g0} if name == "fltrust"
                      else {"generator": streams.generator("aggregator", 5, step)})
            outs.append(whole_of(rule.aggregate(rows, cols, **inputs)))
            sel.append(None if rule.selected is None else rule.selected.clone())
        return outs, sel

    want, want_sel = run(x, Columns(d, WIDTH), lambda t: t)
    assert all(torch.isfinite(w).all() for w in want)
    for world in (1, 2, 4):
        for got, got_sel in on_slices(x, world, run):
            for a, b in zip(got, want):
                assert torch.equal(bits(a), bits(b)), (world, name)
            for a, b in zip(got_sel, want_sel):
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


# ---------------------------------------------------------------------------- config

def make_cfg(rule, n=10, f=2, resampling="none", **agg):
    cfg = config.Config()
    cfg.workers.n, cfg.workers.byzantine = n, f
    cfg.resampling.name = resampling
    cfg.aggregator.name = rule
    for key, value in agg.items():
        setattr(cfg.aggregator, key, value)
    return cfg


def test_validate_checks_requirements_and_parameters():
    for name in ("dnc", "signguard"):
        pipeline.validate(make_cfg(name, n=10, f=4))
        with pytest.raises(ConfigError, match=f"aggregator {name} needs 2f'\\+1 <= m"):
            pipeline.validate(make_cfg(name, n=10, f=3, resampling="s_replacement"))   # f' = 6, m = 10
    pipeline.validate(make_cfg("fltrust", n=10, f=4, resampling="s_replacement"))   # no bound on f'
    with pytest.raises(ConfigError, match="aggregator.c: dnc keeps"):
        pipeline.validate(make_cfg("dnc", n=10, f=2, c=5.0, allow_unsafe=True))
    with pytest.raises(ConfigError, match="aggregator.b: dnc subsamples"):
        pipeline.validate(make_cfg("dnc", b=0))
    with pytest.raises(ConfigError, match="aggregator.norm_low: signguard"):
        pipeline.validate(make_cfg("signguard", norm_low=4.0))
    for key, value, words in (("niters", 0, "integer >= 1"), ("root_size", 0, "integer >= 1"),
                              ("sign_fraction", 1.5, r"fraction in \(0, 1\]"), ("c", -1.0, "positive"),
                              ("norm_high", 0.0, "positive")):
        with pytest.raises(ConfigError, match=f"aggregator.{key}: must be .*{words}"):
            pipeline.validate(make_cfg("signguard", **{key: value}))
    rule = pipeline.build(make_cfg("dnc", n=10, f=2, resampling="bucketing", niters=2, c=0.5)).rule
    assert (rule.f, rule.niters, rule.b, rule.c) == (2, 2, 10000, 0.5)   # 5 buckets, f' = f = 2
    rule = pipeline.build(make_cfg("fltrust", root_size=7)).rule
    assert rule.root_size == 7 and rule.trusted_root and not rule.draws


# ---------------------------------------------------------------------------- the trainer's inputs

def tiny_trainer(monkeypatch, *overrides):
    from byzddp import distributed
    from byzddp.trainer import Trainer
    g = torch.Generator().manual_seed(0)
    tiny = data.Dataset(torch.randn(60, 1, 28, 28, generator=g), torch.randint(0, 10, (60,), generator=g),
                        torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g), 10)
    monkeypatch.setattr(data, "load", lambda cfg: tiny)
    cfg = config.load(None, ["workers.n=4", "workers.byzantine=1", "attack.name=bitflip", "model.hidden=[8]",
                             "resampling.name=none", "train.batch_size=4", "log.progress=false", *overrides])
    return Trainer(cfg, distributed.setup(cfg)), tiny


def test_the_trainer_gives_fltrust_the_root_gradient_and_dnc_the_step_stream(monkeypatch):
    trainer, tiny = tiny_trainer(monkeypatch, "aggregator.name=fltrust", "aggregator.root_size=9", "seed=3")
    trainer.train_step()
    pick = torch.randperm(60, generator=streams.generator("root", 3))[:9]   # documented: seeded, once
    model = copy.deepcopy(trainer.model).train()
    loss = F.cross_entropy(model(tiny.train_x[pick]), tiny.train_y[pick])
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    before = [(p.detach().clone(), p.grad.clone()) for p in trainer.model.parameters()]
    got = trainer.server.rule_inputs(1)
    assert set(got) == {"root_gradient"}
    torch.testing.assert_close(got["root_gradient"], want, rtol=0, atol=0)
    for p, (value, grad) in zip(trainer.model.parameters(), before):   # the replica is untouched
        assert torch.equal(p, value) and torch.equal(p.grad, grad)
    trainer, _ = tiny_trainer(monkeypatch, "aggregator.name=dnc", "seed=3")
    got = trainer.server.rule_inputs(4)
    assert set(got) == {"generator"}
    assert torch.equal(torch.randperm(50, generator=got["generator"]),
                       torch.randperm(50, generator=streams.generator("aggregator", 3, 4)))
    trainer.train_step()
    assert trainer.server.aggregator.selected is not None
    with pytest.raises(ConfigError, match="aggregator.root_size: 61 root examples"):
        tiny_trainer(monkeypatch, "aggregator.name=fltrust", "aggregator.root_size=61")


@pytest.mark.slow
@pytest.mark.distributed
def test_fltrust_gives_one_model_on_one_and_two_ranks_gathered_or_sharded(tmp_path):
    """The root gradient comes from the replica each aggregating rank holds: rank 0 in gather
    mode, every rank under train.exchange=sharded; the models are bit-identical."""
    shas = {}
    for nproc, exchange in ((1, "gather"), (2, "gather"), (2, "sharded")):
        name = f"r{nproc}{exchange}"
        args = [*TINY, "aggregator.name=fltrust", "aggregator.root_size=50", "attack.name=bitflip",
                f"train.exchange={exchange}", f"log.dir={tmp_path}", f"log.name={name}"]
        train(args, nproc=nproc) if nproc > 1 else train(args)
        shas[name] = summary(tmp_path / name)["model_sha256"]
    assert len(set(shas.values())) == 1, shas
