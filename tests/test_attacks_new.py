"""optimal_alie, optimal_ipm, fang's krum target and rop: each against a brute-force definition
written here (a dense grid of scales for the optimal attacks, Krum by hand for fang, the ROP
formula written out), in training on one rank (each changes the model), bit-identical rows and
models on one and two ranks, and the config checks."""
import math
import statistics

import pytest
import torch

from byzddp import attacks, config, pipeline
from byzddp.attacks import AttackContext
from byzddp.attacks.base import pipeline_on
from byzddp.attacks.fang import krum_lambda_bound
from byzddp.distributed import Topology
from byzddp.exchange import Exchange
from helpers import assert_probes_bit_identical, probe_ranks

N, F, D = 10, 2, 40
BYZ = [8, 9]


def _cfg(*overrides):
    return config.load(None, [f"workers.n={N}", f"workers.byzantine={F}", "resampling.name=none", *overrides])


def _honest_rows(seed=0, shared=1.0):
    """Non-iid-looking honest vectors: a shared direction and per-worker noise of three sizes."""
    g = torch.Generator().manual_seed(seed)
    common = shared * torch.randn(D, generator=g)
    rows = torch.stack([common + 0.5 * torch.randn(D, generator=g) * (1 + w % 3) for w in range(N)])
    rows[BYZ] = 0.0
    return rows


def _forge(name, cfg, rows, step=0, previous=None, **params):
    """One forge in this process (one rank) on a copy of `rows`; the attack and the rows sent."""
    attack = attacks.build(name, **params)
    topo = Topology(0, 1, 0, torch.device("cpu"), "none", N)
    sent = rows.clone()
    ctx = AttackContext(step, cfg.seed, sent, range(N), list(BYZ), Exchange(topo), N, F,
                        pipeline.build(cfg) if attack.needs_pipeline else None, previous)
    attack.forge(ctx)
    return attack, sent


# ---------------------------------------------------------------------------- rules by hand

def _median(x):
    s = x.sort(0).values
    m = x.shape[0]
    return s[m // 2] if m % 2 else (s[m // 2 - 1] + s[m // 2]) / 2


def _trimmed(x, b):
    return x.sort(0).values[b:x.shape[0] - b].mean(0)


def _krum_scores(x, f):
    """Each row's sum of squared distances to its m-f-2 nearest other rows (float64)."""
    x = x.double()
    m = x.shape[0]
    pair = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return [float(pair[i][[j for j in range(m) if j != i]].sort().values[:m - f - 2].sum()) for i in range(m)]


def _krum(x, f):
    scores = _krum_scores(x, f)
    return x[min(range(len(scores)), key=lambda i: (scores[i], i))]


RULES = {"cm": _median, "trimmed_mean": lambda x: _trimmed(x, F), "krum": lambda x: _krum(x, F)}


# ---------------------------------------------------------------------------- optimal ALIE / IPM

def _line(name, g):
    mean = g.mean(0)
    if name == "optimal_alie":
        std = ((g - mean) ** 2).sum(0).div(g.shape[0] - 1).sqrt()
        return mean, -std
    return torch.zeros_like(mean), -mean


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("name", ["optimal_alie", "optimal_ipm"])
def test_optimal_scale_is_as_good_as_a_dense_grid(name, rule):
    cfg = _cfg(f"aggregator.name={rule}", f"attack.name={name}", "attack.search_evals=40")
    rows = _honest_rows()
    attack, sent = _forge(name, cfg, rows, search_evals=40)
    honest = [w for w in range(N) if w not in BYZ]
    g = rows[honest].double()
    mean = g.mean(0)
    base, direction = _line(name, g)

    def distance(t):
        x = rows.clone()
        x[BYZ] = (base + t * direction).float()
        return float((RULES[rule](x).double() - mean).norm())

    t = attack.scale
    assert 0 <= t <= cfg.attack.search_max
    assert torch.equal(sent[honest], rows[honest])
    assert torch.allclose(sent[BYZ].double(), (base + t * direction).expand(len(BYZ), -1), rtol=1e-6, atol=1e-6)
    dense = [distance(10.0 * i / 500) for i in range(501)]
    best = max(dense)
    # within 1% of the best of 501 scales (the objective can drop off a cliff, as Krum's does
    # when it stops selecting the forged vector: only the refinement gets that close to the edge)
    assert distance(t) >= best * (1 - 0.01), (t, distance(t), best, dense.index(best) / 50)
    fixed = 0.0 if name == "optimal_alie" else 0.1      # what plain alie (z from n=10, f=2) and ipm send
    assert distance(t) >= distance(fixed)
    if rule != "krum":      # Krum keeps an honest vector against ipm, whatever epsilon: a flat objective
        assert distance(t) > distance(fixed) * 1.1


@pytest.mark.slow          # importing byzfl alone takes over 10 s of CPU (torchvision and more)
@pytest.mark.parametrize("rule", ["cm", "trimmed_mean"])
def test_optimal_ipm_does_at_least_as_much_harm_as_byzfls(rule):
    """ByzFL 0.0.11's Optimal_InnerProductManipulation (its own line search, expanding from 0 by
    doubling steps, then contracting) against the same rule: searching a range that holds ByzFL's
    epsilon, the vector chosen here moves the aggregate at least as far."""
    import byzfl
    rows = _honest_rows(4)
    honest = [w for w in range(N) if w not in BYZ]
    g = rows[honest].double()
    agg = byzfl.Median() if rule == "cm" else byzfl.TrMean(f=F)
    theirs = torch.from_numpy(byzfl.Optimal_InnerProductManipulation(agg=agg, pre_agg_list=[], f=F)(g.numpy()))
    epsilon = float(-(theirs @ g.mean(0)) / (g.mean(0) @ g.mean(0)))
    assert epsilon > 0
    cfg = _cfg(f"aggregator.name={rule}", "attack.name=optimal_ipm")
    _, sent = _forge("optimal_ipm", cfg, rows, search_max=2 * epsilon, search_evals=40)

    def distance(v):
        x = rows.clone()
        x[BYZ] = v.float()
        return float((RULES[rule](x).double() - g.mean(0)).norm())

    assert distance(sent[BYZ[0]]) >= distance(theirs) * (1 - 1e-3)
    assert distance(theirs) > distance(-0.1 * g.mean(0))      # their search does something too


def test_line_search_finds_an_interior_peak_the_top_and_breaks_ties_low():
    t, v = attacks.line_search(lambda x: -(x - 3.7) ** 2, 10.0, 20)
    assert abs(t - 3.7) < 0.05 and v == -(t - 3.7) ** 2
    assert attacks.line_search(lambda x: x, 10.0, 20)[0] == 10.0
    assert attacks.line_search(lambda x: 1.0, 10.0, 20)[0] == 0.0
    calls = []
    attacks.line_search(lambda x: calls.append(x) or 0.0, 5.0, 7)
    assert len(calls) == 7


def test_the_attackers_pipeline_starts_from_the_servers_centre_every_time():
    """cclip: every evaluation starts from the server's centre, the previous update (zero at
    the first step), and leaves nothing behind for the next evaluation."""
    cfg = _cfg("aggregator.name=cclip", "aggregator.tau=1.0", "attack.name=optimal_alie")
    rows = _honest_rows()
    previous = rows[:8].mean(0) * 0.5
    ctx = AttackContext(3, cfg.seed, rows, range(N), BYZ, None, N, F, pipeline.build(cfg), previous)
    first, _ = pipeline_on(ctx, rows)
    again, _ = pipeline_on(ctx, rows)
    assert torch.equal(first, again)
    c = previous.double()
    for _ in range(cfg.aggregator.L):      # centered clipping by hand, from the previous update
        diff = rows.double() - c
        c = c + (diff * (1.0 / diff.norm(dim=1, keepdim=True)).clamp(max=1.0)).mean(0)
    assert torch.allclose(first.double(), c, rtol=1e-5, atol=1e-6)
    ctx.previous = None
    fresh, _ = pipeline_on(ctx, rows)
    assert not torch.allclose(fresh, first)


# ---------------------------------------------------------------------------- fang, krum target

def _bound_by_hand(g, c):
    h, d = g.shape
    m = h + c
    sums = []
    for i in range(h):
        dist = sorted(float((g[i] - g[j]).norm()) for j in range(h) if j != i)
        sums.append(sum(dist[:m - c - 2]))
    return min(sums) / ((m - 2 * c - 1) * math.sqrt(d)) + max(float(r.norm()) for r in g) / math.sqrt(d)


@pytest.mark.parametrize("rule", ["krum", "multikrum"])
def test_fang_krum_target_is_selected_with_the_largest_halving_of_the_bound(rule):
    cfg = _cfg(f"aggregator.name={rule}", "attack.name=fang")
    rows = _honest_rows(1, shared=0.2)     # noisy gradients: a vector near zero can pass for honest
    attack, sent = _forge("fang", cfg, rows)
    honest = [w for w in range(N) if w not in BYZ]
    g = rows[honest].double()
    s = g.sum(0).sign()
    bound = _bound_by_hand(g, len(BYZ))
    assert krum_lambda_bound(g, len(BYZ)) == pytest.approx(bound, rel=1e-9)
    lam = attack.lam
    k = round(math.log2(bound / lam))
    assert lam == pytest.approx(bound / 2 ** k, rel=1e-12) and lam >= 1e-5
    assert torch.allclose(sent[BYZ].double(), (-lam * s).expand(len(BYZ), -1), rtol=1e-6, atol=0)

    def picked(lam_):
        x = rows.clone()
        x[BYZ] = (-lam_ * s).float()
        scores = _krum_scores(x, F)
        order = sorted(range(N), key=lambda i: (scores[i], i))
        return set(order[:1] if rule == "krum" else order[:N - F])

    assert picked(lam) & set(BYZ)                   # Krum (by hand) selects a crafted vector
    if k > 0:
        assert not picked(2 * lam) & set(BYZ)      # and the previous, larger lambda was rejected
    assert (-lam * s).norm() > 0


@pytest.mark.filterwarnings("ignore:aggregator bulyan needs")
def test_fang_target_auto_follows_the_rule_type():
    rows = _honest_rows(2)
    # bulyan here runs outside its guarantee (4f+3 > n): aggregator.allow_unsafe
    for rule, kind in (("krum", "krum"), ("bulyan", "krum"), ("multikrum", "krum"), ("cm", "median"),
                       ("trimmed_mean", "median"), ("meamed", "median")):
        cfg = config.load(None, [f"workers.n={N}", f"workers.byzantine={F}", "resampling.name=none",
                                 f"aggregator.name={rule}", "attack.name=fang", "aggregator.allow_unsafe=true"])
        attack, sent = _forge("fang", cfg, rows)
        assert attack.kind(AttackContext(0, 0, rows, range(N), BYZ, None, N, F, pipeline.build(cfg))) == kind
        if kind == "krum":   # one vector, -lambda * sign(honest mean)
            s = rows[[w for w in range(N) if w not in BYZ]].double().sum(0).sign()
            assert torch.allclose(sent[BYZ[0]].double(), -attack.lam * s, rtol=1e-6, atol=0)
        else:                # per coordinate beyond the honest extreme opposite to the mean's sign
            g = rows[[w for w in range(N) if w not in BYZ]]
            s = g.double().mean(0).sign()
            assert bool(torch.where(s > 0, sent[BYZ[0]] <= g.min(0).values, sent[BYZ[0]] >= g.max(0).values).all())
    assert attacks.build("fang").kind(AttackContext(0, 0, rows, range(N), BYZ, None, N, F)) == "median"
    assert attacks.build("fang", target="krum").kind(AttackContext(0, 0, rows, range(N), BYZ, None, N, F)) == "krum"


# ---------------------------------------------------------------------------- rop

def _rop_by_hand(mu, c, first, z, pi=1.0, lamb=0.9, angle=90.0):
    loc = pi * c + (1 - pi) * mu
    ref = lamb * (mu if first else c) + (1 - lamb) * mu
    ones = torch.ones_like(mu)
    perp = ones - (ones @ ref) / (ref @ ref) * ref
    perp = perp / perp.norm()
    a = math.radians(angle)
    p = math.sin(a) * perp + math.cos(a) * ref / ref.norm()
    return loc + z * p / p.norm(), ref


@pytest.mark.parametrize("angle, pi", [(90.0, 1.0), (30.0, 0.5)])
def test_rop_is_the_relocated_orthogonal_perturbation(angle, pi):
    cfg = _cfg("aggregator.name=cclip", "attack.name=rop")
    rows = _honest_rows(3)
    mu = rows[[w for w in range(N) if w not in BYZ]].double().mean(0)
    for previous in (None, 0.3 * mu.float() + 0.1):
        _, sent = _forge("rop", cfg, rows, step=0 if previous is None else 5, previous=previous,
                         z=2.0, angle=angle, pi=pi)
        c = torch.zeros_like(mu) if previous is None else previous.double()
        want, ref = _rop_by_hand(mu, c, previous is None, 2.0, pi=pi, angle=angle)
        assert torch.allclose(sent[BYZ].double(), want.expand(len(BYZ), -1), rtol=1e-5, atol=1e-6)
        shift = sent[BYZ[0]].double() - (pi * c + (1 - pi) * mu)
        assert float(shift.norm()) == pytest.approx(2.0, rel=1e-5)
        cosine = float(shift @ ref / (shift.norm() * ref.norm()))
        assert cosine == pytest.approx(math.cos(math.radians(angle)), abs=1e-5)
    # default z: ALIE's formula, z = Phi^-1((n - f - s)/(n - f)), s = floor(n/2 + 1) - f
    n = 25
    s_ = math.floor(n / 2 + 1) - F
    assert attacks.build("rop").z is None
    assert attacks.alie_z(n, F) == pytest.approx(statistics.NormalDist().inv_cdf((n - F - s_) / (n - F)))


# ---------------------------------------------------------------------------- config checks

def test_good_settings_load():
    assert config.load(None, ["attack.name=fang", "aggregator.name=bulyan", "workers.n=11", "workers.byzantine=2",
                              "resampling.name=none", "attack.target=krum"]).attack.target == "krum"
    assert config.load(None, ["attack.name=fang"]).attack.target == "auto"
    assert config.load(None, ["attack.name=rop", "attack.z=1.0", "aggregator.name=cclip"]).attack.angle == 90.0


# ---------------------------------------------------------------------------- in training

COMMON = [f"workers.n={N}", f"workers.byzantine={F}", "model.hidden=[8]", "train.batch_size=8",
          "resampling.name=none", "data.test_size=200", "train.steps=2", "train.timeout_s=300",
          "attack.search_evals=6"]
CASES = {
    "none-cm": ["attack.name=none", "aggregator.name=cm"],
    "optimal_alie-cm": ["attack.name=optimal_alie", "aggregator.name=cm"],
    "none-tm-bucketing": ["attack.name=none", "aggregator.name=trimmed_mean", "resampling.name=bucketing"],
    "optimal_ipm-tm-bucketing": ["attack.name=optimal_ipm", "aggregator.name=trimmed_mean",
                                 "resampling.name=bucketing"],
    "none-krum": ["attack.name=none", "aggregator.name=krum"],
    "fang-krum": ["attack.name=fang", "aggregator.name=krum"],
    "none-cclip": ["attack.name=none", "aggregator.name=cclip", "workers.momentum=0.9"],
    "rop-cclip": ["attack.name=rop", "aggregator.name=cclip", "workers.momentum=0.9", "attack.z=1.0"],
}
STEPS = 2
SPEC = {"common": COMMON, "steps": STEPS, "resume_at": 1, "cases": CASES, "resume": ["rop-cclip"]}


def _probe_one_rank(tmp_path):
    import attack_probe
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # as in the ranks: the same kernels, the same bits
    try:
        return attack_probe.run(SPEC, tmp_path)["results"]
    finally:
        torch.set_num_threads(threads)


def _probe_two_ranks(tmp_path):
    return probe_ranks(SPEC, tmp_path / "probe2.pt", 2)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return _probe_one_rank(tmp_path_factory.mktemp("new-attacks1"))


def test_new_attacks_change_training_and_follow_their_definitions(one_rank):
    for label in CASES:
        if label.startswith("none"):
            continue
        base = "none-" + label.split("-", 1)[1]
        assert one_rank[label]["sha"] != one_rank[base]["sha"], f"{label} left the model as {base} does"
    honest = [w for w in range(N) if w not in BYZ]
    res = one_rank["fang-krum"]
    for t in range(STEPS):              # Krum, by hand on the rows sent, picks a crafted vector
        scores = _krum_scores(res["sent"][t], F)
        assert min(range(N), key=lambda i: (scores[i], i)) in BYZ
    res = one_rank["rop-cclip"]
    for t in range(STEPS):              # relocated onto the previous step's update, as broadcast
        mu = res["rows"][t][honest].double().mean(0)
        c = torch.zeros_like(mu) if t == 0 else res["aggregate"][t - 1].double()
        want, _ = _rop_by_hand(mu, c, t == 0, 1.0)
        assert torch.allclose(res["sent"][t][BYZ].double(), want.expand(len(BYZ), -1), rtol=1e-5, atol=1e-6)
    assert res["resumed_sha"] == res["sha"]        # the previous update is carried by checkpoints
    for label in ("optimal_alie-cm", "optimal_ipm-tm-bucketing"):
        sent = one_rank[label]["sent"]
        assert all(torch.equal(sent[t][BYZ[0]], sent[t][BYZ[1]]) for t in range(STEPS))
    assert {"optimal_alie", "optimal_ipm", "rop", "fang"} <= set(attacks.ATTACKS)


@pytest.mark.slow
@pytest.mark.distributed
def test_new_attacks_are_bit_identical_on_one_and_two_ranks(one_rank, tmp_path):
    two = _probe_two_ranks(tmp_path)
    assert_probes_bit_identical(one_rank, two, CASES)
    assert two["rop-cclip"]["resumed_sha"] == one_rank["rop-cclip"]["sha"]


@pytest.mark.parametrize("rule", ["dnc", "signguard", "fltrust"])
def test_the_attackers_pipeline_runs_rules_that_draw_or_need_a_root_gradient(rule):
    """dnc and signguard draw from the attacker's own (seed, step) stream, fltrust gets the honest
    mean for the server's private root gradient: the forged rows are the same on a second forge."""
    cfg = _cfg(f"aggregator.name={rule}", "attack.name=optimal_alie", "attack.search_evals=8")
    rows = _honest_rows()
    first, sent = _forge("optimal_alie", cfg, rows, search_evals=8)
    again, sent_again = _forge("optimal_alie", cfg, rows, search_evals=8)
    assert torch.isfinite(sent).all()
    assert torch.equal(sent, sent_again) and first.scale == again.scale
    honest = [w for w in range(N) if w not in BYZ]
    assert torch.equal(sent[honest], rows[honest])
