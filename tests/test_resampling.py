"""Pre-aggregation: Algorithm 2's counting and variance properties (Proposition I), bucketing,
Algorithm 3, fixed groups, nearest-neighbour mixing, determinism, and config checks."""
import math

import pytest
import torch

from byzddp import config, pipeline, resampling as R, streams
from byzddp.config import ConfigError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gen(step, seed=0):
    return streams.generator("resampling", seed, step)


def rows(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def group_means(x, groups):
    """Brute force: output j is the plain mean of the inputs listed in groups[j]."""
    return torch.stack([torch.stack([x[i] for i in g.tolist()]).mean(dim=0) for g in groups])


# ---------------------------------------------------------------------------- Algorithm 2

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, s", [(10, 2), (7, 3), (5, 1), (4, 4)])
def test_s_replacement_uses_each_input_exactly_s_times(n, s, device):
    x = rows(n, 6).to(device)
    r = R.build("s_replacement", s=s)
    for step in range(20):
        out, groups = r(x, gen(step))
        assert out.shape == (n, 6) and r.num_outputs(n) == n
        assert all(len(g) == s for g in groups)
        counts = torch.bincount(torch.cat(groups), minlength=n)
        assert counts.tolist() == [s] * n
        torch.testing.assert_close(out.cpu(), group_means(x.cpu(), groups))
        # Each input counted s times over n outputs of s: the outputs' mean is the inputs' mean.
        torch.testing.assert_close(out.mean(dim=0), x.mean(dim=0))


def test_s_replacement_lets_a_byzantine_input_touch_at_most_s_outputs():
    n, s, f = 10, 3, 2
    r = R.build("s_replacement", s=s)
    assert r.byzantine_outputs(n, f) == s * f
    worst = 0
    for step in range(300):
        byzantine = set(torch.randperm(n, generator=torch.Generator().manual_seed(step))[:f].tolist())
        _, groups = r(rows(n, 2), gen(step))
        touched = sum(1 for g in groups if byzantine & set(g.tolist()))
        worst = max(worst, touched)
    assert worst <= s * f
    assert worst == s * f  # and the bound is reached


def output_variance(name, x, s, draws):
    """Mean over draws of (1/T) sum_t ||out_t - mu||^2."""
    r = R.build(name, s=s)
    g = gen(0, seed=5)  # one stream, drawn on: independent draws
    outs = torch.stack([r(x, g)[0] for _ in range(draws)])
    return ((outs - x.mean(dim=0)) ** 2).sum(dim=-1).mean().item()


def test_s_replacement_shrinks_the_variance_as_proposition_one_states():
    n, s = 10, 2
    x = rows(n, 4, seed=3) * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    sigma2 = ((x - x.mean(dim=0)) ** 2).sum(dim=1).mean().item()
    got = output_variance("s_replacement", x, s, draws=2000)
    want = (n - 1) / (s * n - 1) * sigma2          # 9/19: sampling without replacement
    assert abs(got / want - 1) < 0.05
    # Algorithm 3 (with replacement) only reaches sigma^2 / s; with s = 5 that is 1/5 against
    # Algorithm 2's 9/49, far enough apart to tell the two sampling models apart.
    got3 = output_variance("with_replacement", x, 5, draws=1500)
    assert abs(got3 / (sigma2 / 5) - 1) < 0.06
    got5 = output_variance("s_replacement", x, 5, draws=1500)
    assert abs(got5 / ((n - 1) / (5 * n - 1) * sigma2) - 1) < 0.06
    assert got5 < 0.95 * got3


def test_s_equal_one_is_a_shuffle():
    x = rows(6, 3)
    for name in ("s_replacement", "bucketing"):
        out, groups = R.build(name, s=1)(x, gen(1))
        perm = torch.cat(groups)
        assert sorted(perm.tolist()) == list(range(6))
        assert torch.equal(out, x[perm])
        assert R.build(name, s=1).byzantine_outputs(6, 2) == 2


# ---------------------------------------------------------------------------- bucketing, fixed groups

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, s", [(10, 2), (10, 3), (7, 7), (9, 4)])
def test_bucketing_averages_a_fresh_partition_each_step(n, s, device):
    x = rows(n, 5).to(device)
    r = R.build("bucketing", s=s)
    m = math.ceil(n / s)
    assert r.num_outputs(n) == m and r.byzantine_outputs(n, 3) == min(3, m)
    seen = set()
    for step in range(10):
        out, groups = r(x, gen(step))
        assert out.shape == (m, 5)
        assert sorted(torch.cat(groups).tolist()) == list(range(n))         # a partition
        assert [len(g) for g in groups] == [s] * (n // s) + ([n % s] if n % s else [])
        torch.testing.assert_close(out.cpu(), group_means(x.cpu(), groups))
        seen.add(tuple(torch.cat(groups).tolist()))
    if s < n:
        assert len(seen) > 1                                                 # fresh every step
    again, groups_again = r(x, gen(3))
    _, groups3 = r(x, gen(3))
    assert [g.tolist() for g in groups_again] == [g.tolist() for g in groups3]


def test_fixed_groups_are_drawn_once_from_the_seed_and_checkpointed():
    x = rows(10, 3)
    r = R.build("fixed_groups", s=3, seed=4)
    assert r.state_dict() == {}
    first = [g.tolist() for g in r(x, gen(0))[1]]
    for step in range(1, 5):
        out, groups = r(x, gen(step))
        assert [g.tolist() for g in groups] == first
        torch.testing.assert_close(out, group_means(x, groups))
    assert sorted(sum(first, [])) == list(range(10)) and len(first) == 4
    # The same seed draws the same groups, another seed (almost surely) others.
    assert [g.tolist() for g in R.build("fixed_groups", s=3, seed=4)(x, gen(9))[1]] == first
    assert [g.tolist() for g in R.build("fixed_groups", s=3, seed=5)(x, gen(0))[1]] != first
    # A resumed run keeps its groups.
    state = r.state_dict()
    resumed = R.build("fixed_groups", s=3, seed=99)
    resumed.load_state_dict(state)
    assert [g.tolist() for g in resumed(x, gen(7))[1]] == first
    assert R.build("fixed_groups", s=3).byzantine_outputs(10, 2) == 2


# ---------------------------------------------------------------------------- Algorithm 3

def test_with_replacement_draws_uniformly_and_its_f_prime_bounds_the_expectation():
    n, s, f = 10, 2, 2
    r = R.build("with_replacement", s=s)
    byzantine = {8, 9}
    x = rows(n, 3)
    touched, counts = 0.0, torch.zeros(n)
    draws = 2000
    for step in range(draws):
        out, groups = r(x, gen(step))
        assert len(groups) == n and all(len(g) == s for g in groups)
        if step < 20:
            torch.testing.assert_close(out, group_means(x, groups))
        touched += sum(1 for g in groups if byzantine & set(g.tolist()))
        counts += torch.bincount(torch.cat(groups), minlength=n)
    expected = n * (1 - (1 - f / n) ** s)                    # Lemma 3: 3.6 of 10 outputs
    assert abs(touched / draws - expected) < 0.1
    assert expected <= r.byzantine_outputs(n, f) == s * f
    share = counts / counts.sum()
    assert (share - 1 / n).abs().max() < 0.01                # uniform over inputs


# ---------------------------------------------------------------------------- nnm

def ref_nnm(x, f):
    n = x.shape[0]
    data = x.tolist()
    out, groups = [], []
    for i in range(n):
        dist = [math.fsum((a - b) ** 2 for a, b in zip(data[i], data[j])) for j in range(n)]
        near = sorted(range(n), key=lambda j: (dist[j], j))[:n - f]
        groups.append(near)
        out.append([math.fsum(data[j][c] for j in near) / (n - f) for c in range(len(data[0]))])
    return torch.tensor(out, dtype=torch.float64), groups


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, f", [(7, 2), (10, 3), (5, 0)])
def test_nnm_mixes_each_vector_with_its_nearest(n, f, device):
    x = rows(n, 4, seed=n) * torch.arange(1, n + 1, dtype=torch.float64)[:, None]
    r = R.build("nnm", f=f)
    out, groups = r(x.to(device), gen(0))
    want, want_groups = ref_nnm(x, f)
    torch.testing.assert_close(out.cpu(), want)
    assert [g.tolist() for g in groups] == want_groups
    assert r.num_outputs(n) == n and r.byzantine_outputs(n, f) == f
    if f == 0:
        torch.testing.assert_close(out.cpu(), x.mean(dim=0).expand(n, -1))


@pytest.mark.parametrize("kind", [math.nan, math.inf, -math.inf])
def test_nnm_keeps_non_finite_rows_out_of_every_output(kind):
    x = rows(9, 4)
    x[[2, 6]] = kind
    out, groups = R.build("nnm", f=2)(x, gen(0))
    assert torch.isfinite(out).all()
    assert all(not ({2, 6} & set(g.tolist())) for g in groups)
    # Each honest row's n-f = 7 nearest are exactly the 7 honest rows; a bad row takes the 7
    # finite rows of lowest index, here the same 7.
    honest = [i for i in range(9) if i not in (2, 6)]
    torch.testing.assert_close(out, x[honest].mean(dim=0).expand(9, -1))


# ---------------------------------------------------------------------------- shared behaviour

def test_none_passes_the_vectors_through():
    x = rows(5, 3)
    out, groups = R.build("none")(x, gen(0))
    assert torch.equal(out, x) and [g.tolist() for g in groups] == [[i] for i in range(5)]
    assert R.build("none").byzantine_outputs(5, 2) == 2


@pytest.mark.parametrize("name", R.NAMES)
def test_a_nan_input_only_spoils_the_outputs_that_average_it(name):
    x = rows(8, 3)
    x[5] = math.nan
    out, groups = R.build(name, s=2, f=1)(x, gen(2))
    for j, g in enumerate(groups):
        assert bool(torch.isnan(out[j]).any()) == (5 in g.tolist())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", R.NAMES)
def test_the_same_key_draws_the_same_groups_on_every_device(name, device):
    x = rows(12, 5)
    r_cpu, r_dev = R.build(name, s=3, f=2, seed=1), R.build(name, s=3, f=2, seed=1)
    for step in range(3):
        out_cpu, g_cpu = r_cpu(x, gen(step))
        out_dev, g_dev = r_dev(x.to(device), gen(step))
        assert [g.tolist() for g in g_cpu] == [g.tolist() for g in g_dev]
        assert all(g.device.type == "cpu" for g in g_dev)
        torch.testing.assert_close(out_dev.cpu(), out_cpu)


def test_float32_in_float32_out():
    x = rows(6, 3).float()
    for name in R.NAMES:
        out, _ = R.build(name, s=2, f=1)(x, gen(0))
        assert out.dtype == torch.float32


def check(cfg):
    R.check(cfg.resampling.name, cfg.resampling.s, cfg.workers.n, cfg.workers.byzantine)


def make_cfg(name, s=2, n=10, f=2):
    cfg = config.Config()
    cfg.workers.n, cfg.workers.byzantine = n, f
    cfg.resampling.name, cfg.resampling.s = name, s
    return cfg


@pytest.mark.parametrize("name, s, n, f, words", [
    ("shuffle", 2, 10, 2, ["resampling.name", "shuffle"]),
    ("bucketing", 0, 10, 2, ["resampling.s", ">= 1"]),
    ("s_replacement", 11, 10, 2, ["resampling.s", "s=11", "at most 10"]),
    ("nnm", 2, 10, 5, ["nnm", "f < n/2"]),
])
def test_validate_refuses_what_cannot_run(name, s, n, f, words):
    with pytest.raises(ConfigError) as info:
        check(make_cfg(name, s, n, f))
    assert "\n" not in str(info.value)
    for w in words:
        assert w in str(info.value)


def test_validate_and_build_accept_what_can():
    for name in R.NAMES:
        cfg = make_cfg(name, s=3, n=10, f=2)
        check(cfg)
        r = pipeline.build(cfg).pre
        assert (r.name, r.s, r.f) == (name, 3, 2)
    check(make_cfg("none", s=50))  # s does not matter without groups
    with pytest.raises(ConfigError, match="unknown resampling"):
        R.build("jackknife")
    with pytest.raises(ConfigError, match="s must be"):
        R.build("bucketing", s=0)
