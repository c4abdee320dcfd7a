"""attack.name=adaptive: each step the candidate of the families (alie, ipm, scaled sign flip,
mimic, minmax, minsum) that moves the attacker's copy of the pipeline farthest from the honest
mean, against a brute force written here (its own grid, its own principal direction, the
families' own attacks forged through their classes); the same bits on 1 and 2 ranks."""

import pytest
import torch

from byzddp import attacks, config, pipeline
from byzddp.attacks import AttackContext
from byzddp.distributed import Topology
from byzddp.errors import ConfigError
from byzddp.exchange import Exchange
from helpers import assert_probes_bit_identical, probe_ranks

N, F, D = 10, 2, 30
BYZ = [8, 9]
HONEST = [w for w in range(N) if w not in BYZ]


def _cfg(*overrides):
    return config.load(None, [f"workers.n={N}", f"workers.byzantine={F}", "resampling.name=none", *overrides])


def _rows(seed=0):
    """Heterogeneous vectors for all n workers (the Byzantine ones hold their own honest-looking
    vectors, which signflip negates)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(D, generator=g)
    return torch.stack([common + 0.5 * torch.randn(D, generator=g) * (1 + w % 3) for w in range(N)])


def _forge(name, cfg, rows, **params):
    attack = attacks.build(name, **params)
    topo = Topology(0, 1, 0, torch.device("cpu"), "none", N)
    sent = rows.clone()
    ctx = AttackContext(0, cfg.seed, sent, range(N), list(BYZ), Exchange(topo), N, F,
                        pipeline.build(cfg) if attack.needs_pipeline else None, None)
    attack.forge(ctx)
    return attack, sent


def _brute_force(rows, grid=4, top=10.0):
    """Every candidate vector set by hand: (family, (f, d) rows)."""
    g = rows[HONEST].double()
    mu, sd = g.mean(0), ((g - g.mean(0)) ** 2).sum(0).div(len(HONEST) - 1).sqrt()
    scales = [top / 2 ** k for k in range(grid)]
    z_own = attacks.alie_z(N, F)
    out = [("alie", (mu - z * sd).expand(F, -1)) for z in [z_own, *scales]]
    out += [("ipm", (-e * mu).expand(F, -1)) for e in [0.1, *scales]]
    out += [("signflip", -t * rows[BYZ].double()) for t in [1.0, *scales]]
    u = torch.linalg.svd(g - mu, full_matrices=False).Vh[0]
    far = sorted(range(len(HONEST)), key=lambda j: -abs(float((g[j] - mu) @ u)))[:grid]
    out += [("mimic", g[j].expand(F, -1)) for j in far]
    for name in ("minmax", "minsum"):
        _, sent = _forge(name, _cfg(f"attack.name={name}"), rows)
        out.append((name, sent[BYZ].double()))
    return out


def _distance(rule, rows, byz_rows, objective="distance"):
    """The objective by hand: ||F - mu||, or -<F, mu>/||mu|| (alignment)."""
    x = rows.clone()
    x[BYZ] = byz_rows.float()
    agg = pipeline.build(_cfg(f"aggregator.name={rule}")).rule(x).double()
    mu = rows[HONEST].double().mean(0)
    if objective == "alignment":
        return float(-(agg * mu).sum() / mu.square().sum().sqrt())
    return float((agg - mu).norm())


@pytest.mark.parametrize("objective", ["distance", "alignment"])
@pytest.mark.parametrize("rule", ["cm", "trimmed_mean", "krum", "multikrum", "rfa", "cclip", "mean", "meamed"])
def test_adaptive_sends_the_best_candidate_of_a_brute_force(rule, objective):
    rows = _rows(1)
    cfg = _cfg(f"aggregator.name={rule}", "attack.name=adaptive", f"attack.objective={objective}")
    attack, sent = _forge("adaptive", cfg, rows, objective=objective)
    assert torch.equal(sent[HONEST], rows[HONEST])
    got = _distance(rule, rows, sent[BYZ], objective)
    scored = [(name, _distance(rule, rows, v, objective)) for name, v in _brute_force(rows)]
    best = max(d for _, d in scored)
    assert got == pytest.approx(best, rel=1e-6, abs=1e-9), (attack.choice, scored)
    assert attack.choice[0] in {name for name, d in scored if d == pytest.approx(best, rel=1e-6, abs=1e-9)}
    # at least as damaging, this step, as each family's own attack with its default parameters
    for name in ("alie", "ipm", "bitflip", "minmax", "minsum"):
        _, theirs = _forge(name, _cfg(f"attack.name={name}"), rows)
        assert got >= _distance(rule, rows, theirs[BYZ], objective) - 1e-6 * abs(got), name
    if attack.choice[0] != "signflip":      # one vector for every attacker
        assert torch.equal(sent[BYZ[0]], sent[BYZ[1]])


def test_adaptive_runs_against_a_plug_in_rule_and_draws_deterministically():
    for overrides in (["aggregator.name=examples.my_rule:NormFilter"],
                      ["aggregator.name=cm", "resampling.name=bucketing"],
                      ["aggregator.name=dnc"]):
        cfg = _cfg(*overrides, "attack.name=adaptive")
        rows = _rows(2)
        first, sent = _forge("adaptive", cfg, rows, grid=2)
        again, sent_again = _forge("adaptive", cfg, rows, grid=2)
        assert torch.isfinite(sent).all() and torch.equal(sent, sent_again)
        assert first.choice == again.choice and first.choice[0] in attacks.adaptive.FAMILIES


def test_the_grid_sets_the_number_of_pipeline_evaluations():
    cfg = _cfg("aggregator.name=cm", "attack.name=adaptive")
    rows = _rows(3)
    for grid in (1, 3):
        attack = attacks.build("adaptive", grid=grid)
        calls = []
        p = pipeline.build(cfg)
        aggregate = p.rule.aggregate
        p.rule.aggregate = lambda x, **kw: calls.append(1) or aggregate(x, **kw)
        topo = Topology(0, 1, 0, torch.device("cpu"), "none", N)
        attack.forge(AttackContext(0, cfg.seed, rows.clone(), range(N), list(BYZ), Exchange(topo), N, F, p, None))
        assert len(calls) == 4 * grid + 5


@pytest.mark.parametrize("overrides, key", [
    (["attack.grid=0"], "attack.grid"),
    (["attack.grid=2.5"], "attack.grid"),
    (["attack.objective=far"], "attack.objective"),
    (["attack.search_max=0"], "attack.search_max"),
    (["workers.participation=0.5"], "workers.participation"),
])
def test_bad_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(None, [f"workers.n={N}", f"workers.byzantine={F}", "attack.name=adaptive", *overrides])


# ---------------------------------------------------------------------------- in training

COMMON = [f"workers.n={N}", f"workers.byzantine={F}", "model.hidden=[8]", "train.batch_size=8",
          "resampling.name=none", "data.test_size=200", "train.steps=2", "train.timeout_s=300", "attack.grid=2"]
CASES = {
    "none-cm": ["attack.name=none", "aggregator.name=cm"],
    "adaptive-cm": ["attack.name=adaptive", "aggregator.name=cm"],
    "adaptive-cclip": ["attack.name=adaptive", "aggregator.name=cclip", "workers.momentum=0.9"],
    "adaptive-tm-bucketing": ["attack.name=adaptive", "aggregator.name=trimmed_mean", "resampling.name=bucketing"],
    "adaptive-plugin": ["attack.name=adaptive", "aggregator.name=examples.my_rule:NormFilter"],
}
SPEC = {"common": COMMON, "steps": 2, "resume_at": 1, "cases": CASES, "resume": ["adaptive-cclip"]}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    import attack_probe
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # as in the ranks: the same kernels, the same bits
    try:
        return attack_probe.run(SPEC, tmp_path_factory.mktemp("adaptive1"))["results"]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_adaptive_changes_training_and_resumes_to_the_same_bits(one_rank):
    assert one_rank["adaptive-cm"]["sha"] != one_rank["none-cm"]["sha"]
    for label in ("adaptive-cm", "adaptive-tm-bucketing", "adaptive-plugin"):
        sent, rows = one_rank[label]["sent"], one_rank[label]["rows"]
        assert torch.equal(sent[:, HONEST], rows[:, HONEST])
        assert not torch.equal(sent[:, BYZ], rows[:, BYZ])
    assert one_rank["adaptive-cclip"]["resumed_sha"] == one_rank["adaptive-cclip"]["sha"]


@pytest.mark.slow
@pytest.mark.distributed
def test_adaptive_is_bit_identical_on_one_and_two_ranks(one_rank, tmp_path):
    two = probe_ranks(SPEC, tmp_path / "adaptive2.pt", 2)
    assert_probes_bit_identical(one_rank, two, CASES)
    assert two["adaptive-cclip"]["resumed_sha"] == one_rank["adaptive-cclip"]["sha"]
