"""Byzantine attacks over real process groups: every forged vector against its formula computed
here in float64 from the honest vectors, bit-identical results on 1, 2 and 4 ranks, every
attack changing training, resume, the Byzantine set, and the config checks."""
import math
import statistics
import threading

import pytest
import torch
import torch.nn.functional as F

from byzddp import attacks, config, data, models, streams
from byzddp.config import ConfigError
from helpers import TINY, probe_ranks, summary

N, F_DECLARED, STEPS = 10, 2, 3
COMMON = [f"workers.n={N}", f"workers.byzantine={F_DECLARED}", "model.hidden=[8]", "train.batch_size=8",
          "aggregator.name=mean", "resampling.name=none", "data.test_size=200", f"train.steps={STEPS}",
          "train.timeout_s=300"]
CASES = {
    "none": ["attack.name=none"],
    "none-two-groups": ["attack.name=none", "data.partition=two_groups"],
    "bitflip": ["attack.name=bitflip"],
    "labelflip": ["attack.name=labelflip"],
    "gaussian": ["attack.name=gaussian"],
    "nm": ["attack.name=nm"],
    "alie": ["attack.name=alie"],
    "alie-count3": ["attack.name=alie", "attack.count=3"],            # real f 3 > declared f 2
    "alie-momentum": ["attack.name=alie", "attack.z=1.0", "workers.momentum=0.9"],
    "ipm": ["attack.name=ipm"],
    "ipm-rotate": ["attack.name=ipm", "attack.rotate=true", "attack.count=3"],
    "minmax": ["attack.name=minmax"],
    "minmax-unit": ["attack.name=minmax", "attack.perturbation=unit"],
    "minsum": ["attack.name=minsum"],
    "minsum-sign": ["attack.name=minsum", "attack.perturbation=sign"],
    "nan": ["attack.name=nan"],
    "inf": ["attack.name=inf"],
    "zero": ["attack.name=zero"],
    "stale": ["attack.name=stale", "attack.delay=1"],
    "stale-rotate": ["attack.name=stale", "attack.delay=1", "attack.rotate=true", "attack.count=3"],
    "mimic": ["attack.name=mimic", "attack.warmup=2"],
    "mimic2": ["attack.name=mimic2", "data.partition=two_groups"],
    "fang": ["attack.name=fang"],
}
RESUME = ["stale", "stale-rotate", "mimic"]
# Each attack of the issue and the no-attack run it must differ from.
BASELINE = {name: "none" for name in ("bitflip", "labelflip", "gaussian", "nm", "alie", "ipm", "minmax",
                                      "minsum", "nan", "inf", "zero", "stale", "mimic", "fang")}
BASELINE["mimic2"] = "none-two-groups"


def cfg_of(label):
    return config.load(None, [*COMMON, *CASES[label]])


SPEC = {"common": COMMON, "steps": STEPS, "resume_at": 1, "cases": CASES, "resume": RESUME}


def _run_probe(tmp_path, nproc):
    if nproc == 1:   # in this process, no process group: the `python train.py` path
        import attack_probe
        threads = torch.get_num_threads()
        torch.set_num_threads(1)        # as in the ranks: the same kernels, the same bits
        try:
            return attack_probe.run(SPEC, tmp_path)["results"]
        finally:
            torch.set_num_threads(threads)
    return probe_ranks(SPEC, tmp_path / f"probe{nproc}.pt", nproc)


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """Every case on 1, 2 and 4 ranks (10 workers: blocks 10 | 5, 5 | 3, 3, 2, 2 with padding)."""
    return {nproc: _run_probe(tmp_path_factory.mktemp(f"attack{nproc}"), nproc) for nproc in (1, 2, 4)}


# ---------------------------------------------------------------------------- the formulas

def _honest(byz):
    return [w for w in range(N) if w not in byz]


def _mean_std(g):
    """Coordinate-wise mean and sample std (denominator h - 1), written out."""
    h = g.shape[0]
    mean = g.sum(0) / h
    return mean, ((g - mean) ** 2).sum(0).div(h - 1).sqrt()


def _phi_inv_z(n, f):
    s = math.floor(n / 2 + 1) - f
    return statistics.NormalDist().inv_cdf((n - f - s) / (n - f))


def _close(got, want, scale=1e-9):
    """A forged float32 vector against a float64 formula: float32 rounding, nothing more."""
    assert torch.allclose(got.double(), want, rtol=2e-6, atol=scale * float(want.abs().max()) + 1e-30), \
        float((got.double() - want).abs().max())


def _check_gamma_search(label, g, m):
    """minmax/minsum: m = mean + gamma p, gamma > 0 fits the bound and is the largest that does."""
    kind = "minmax" if label.startswith("minmax") else "minsum"
    perturbation = CASES[label][1].split("=")[1] if len(CASES[label]) > 1 else "std"
    mean, std = _mean_std(g)
    p = {"std": -std, "unit": -mean / mean.norm(), "sign": -mean.sign()}[perturbation]
    gamma = float((m - mean) @ p / (p @ p))
    _close(m.float(), mean + gamma * p, scale=1e-6)     # gamma itself is read off a float32 vector
    h = g.shape[0]
    pair = torch.tensor([[float(((g[i] - g[j]) ** 2).sum()) for j in range(h)] for i in range(h)],
                        dtype=torch.float64)

    def excess(gamma):
        dist2 = torch.stack([((mean + gamma * p - g[i]) ** 2).sum() for i in range(h)])
        if kind == "minmax":
            return float(dist2.max() / pair.max()) - 1
        return float(dist2.sum() / pair.sum(1).max()) - 1

    assert gamma > 0
    assert excess(gamma) <= 1e-6                     # within the honest spread
    assert excess(gamma + 1e-4) > 0                  # and the largest such gamma (tol 1e-5)


def _mimic_targets(rows, honest, seed, warmup):
    """The official warm-up, written out: random z, power steps averaged, argmax <g_i, z>."""
    z = torch.randn(rows.shape[-1], generator=streams.generator("mimic", seed), dtype=torch.float64)
    targets, mu = [], None
    for t in range(rows.shape[0]):
        if t >= warmup:
            targets.append(targets[-1])
            continue
        g = rows[t][honest].double()
        mean = g.mean(0)
        mu = mean if t == 0 else t / (1 + t) * mu + mean / (1 + t)
        cumu = sum(((gi - mu) @ z) * (gi - mu) for gi in g)
        step = cumu / cumu.norm()
        z = step if t == 0 else t / (1 + t) * z + step / (1 + t)
        z = z / z.norm()
        targets.append(honest[int((g @ z).argmax())])
    return targets


def _labelflip_vector(worker, cfg):
    """Worker `worker`'s gradient at step 0 on labels 9 - y, computed alone in this process."""
    ds = data.load(cfg)
    wd = data.WorkerData(ds, cfg, attacks.byzantine_set(cfg, 0))
    model = models.build(cfg, (1, 28, 28), 10)
    x, y = wd.batch_of(worker, 0)
    F.cross_entropy(model(x), 9 - y).backward()
    flipped = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    true = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return flipped, true


def check_case(label, res):
    cfg = cfg_of(label)
    rows, sent = res["rows"], res["sent"]
    name = cfg.attack.name
    for t in range(STEPS):
        byz = res["byzantine"][t]
        assert byz == attacks.byzantine_set(cfg, t)
        honest = _honest(byz)
        assert torch.equal(sent[t][honest], rows[t][honest])      # honest vectors untouched
        g = rows[t][honest].double()
        forged = sent[t][byz]
        if name in ("alie", "ipm", "nm", "minmax", "minsum", "mimic", "mimic2"):
            assert all(torch.equal(v, forged[0]) for v in forged)  # colluders send one vector
        if name == "none":
            assert byz == [] and torch.equal(sent[t], rows[t])
        elif name == "bitflip":
            assert torch.equal(forged, -rows[t][byz])
        elif name in ("labelflip",):
            assert torch.equal(forged, rows[t][byz])               # its own honest-looking vector
        elif name == "gaussian":
            for w in byz:
                noise = torch.randn(rows.shape[-1], generator=streams.generator("gaussian", cfg.seed, w, t))
                assert torch.equal(sent[t][w], noise * 200.0)
        elif name == "nm":
            _close(forged[0], -(g / g.norm(dim=1, keepdim=True)).sum(0))
        elif name == "alie":
            z = cfg.attack.z if cfg.attack.z is not None else _phi_inv_z(N, len(byz))
            mean, std = _mean_std(g)
            _close(forged[0], mean - z * std)
        elif name == "ipm":
            _close(forged[0], -0.1 * g.mean(0))
        elif name in ("minmax", "minsum"):
            _check_gamma_search(label, g, forged[0].double())
        elif name == "nan":
            assert torch.isnan(forged).all()
        elif name == "inf":
            assert torch.isposinf(forged).all()
        elif name == "zero":
            assert torch.equal(forged, torch.zeros_like(forged))
        elif name == "stale":
            for w in byz:
                mine = [s for s in range(t + 1) if w in res["byzantine"][s]]   # its Byzantine steps
                assert torch.equal(sent[t][w], rows[mine[-2:][0]][w])          # delay 1
        elif name == "mimic":
            target = _mimic_targets(rows, honest, cfg.seed, cfg.attack.warmup)[t]
            assert torch.equal(forged[0], rows[t][target])
        elif name == "mimic2":
            first = (len(honest) + 1) // 2
            groups = honest[:first], honest[first:]
            assert all(torch.equal(rows[t][w], rows[t][groups[0][0]]) for w in groups[0])
            assert all(torch.equal(rows[t][w], rows[t][groups[1][0]]) for w in groups[1])
            assert not torch.equal(rows[t][groups[0][0]], rows[t][groups[1][0]])
            assert torch.equal(forged[0], rows[t][groups[0][0]])
        elif name == "fang":
            s = g.mean(0).sign()
            top, low = g.max(0).values, g.min(0).values
            for w in byz:
                b = 1 + torch.rand(rows.shape[-1], generator=streams.generator("fang", cfg.seed, t, w),
                                   dtype=torch.float64)
                for j in range(0, rows.shape[-1], 97):      # coordinate by coordinate, a sample
                    e = float(low[j]) if s[j] > 0 else float(top[j])
                    out = (e < 0) if s[j] > 0 else (e > 0)
                    want = e * float(b[j]) if out else e / float(b[j])
                    assert float(sent[t][w][j]) == pytest.approx(want, rel=1e-6, abs=1e-30)
                    assert (float(sent[t][w][j]) <= e) if s[j] > 0 else (float(sent[t][w][j]) >= e)
        else:
            raise AssertionError(f"no formula for {label}")


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_forged_vectors_are_the_attacks_formulas(probes, nproc):
    for label, res in probes[nproc].items():
        try:
            check_case(label, res)
        except AssertionError as e:
            raise AssertionError(f"{label} on {nproc} ranks: {e}") from None


def test_labelflip_trains_on_flipped_labels(probes):
    cfg = cfg_of("labelflip")
    rows = probes[1]["labelflip"]["rows"][0]
    for w in attacks.byzantine_set(cfg, 0):
        flipped, true = _labelflip_vector(w, cfg)
        assert torch.allclose(rows[w], flipped, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(rows[w], true, rtol=1e-2, atol=1e-4)


def test_mimic_copies_a_fixed_target_after_the_warm_up(probes):
    res = probes[1]["mimic"]
    byz = res["byzantine"][0]
    targets = [next(w for w in range(N) if torch.equal(res["rows"][t][w], res["sent"][t][byz[0]]))
               for t in range(STEPS)]
    assert targets[2] == targets[1] and targets[1] not in byz


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(_bits(a), _bits(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_every_attack_is_bit_identical_on_one_two_four_ranks(probes):
    assert probes[1].keys() == probes[2].keys() == probes[4].keys() == CASES.keys()
    for label in CASES:
        one = probes[1][label]
        for nproc in (2, 4):
            other = probes[nproc][label]
            for key in ("rows", "sent", "aggregate", "byzantine", "sha"):
                assert _same(one[key], other[key]), f"{label}: {key} differs on {nproc} ranks"


def test_resume_reproduces_attack_state_on_any_rank_count(probes):
    for label in RESUME:
        one = probes[1][label]
        assert one["resumed_sha"] == one["sha"], label
        state = one["attack_state"]
        if label.startswith("stale"):    # a buffer for each worker that had attacked by step 1
            assert sorted(state["history"]) == sorted(set(w for s in one["byzantine"][:1] for w in s))
        else:                            # mid-warm-up: the running estimates are carried
            assert state["mu"] is not None and state["z"] is not None and state["target"] >= 0
        for nproc in (2, 4):
            other = probes[nproc][label]
            assert other["resumed_sha"] == one["sha"], f"{label} on {nproc} ranks"
            assert _same(other["attack_state"], state), f"{label}: checkpointed state on {nproc} ranks"


def test_every_attack_changes_training(probes):
    res = probes[1]
    for label, base in BASELINE.items():
        assert res[label]["sha"] != res[base]["sha"], f"{label} left the model as {base} does"
        assert not torch.equal(res[label]["aggregate"], res[base]["aggregate"]), label
    # optimal_alie, optimal_ipm and rop change training in tests/test_attacks_new.py, backdoor
    # (poisoned batches, boosted rows) in tests/test_federated.py, adaptive in tests/test_adaptive.py
    assert set(BASELINE) >= set(attacks.ATTACKS) - {"none", "optimal_alie", "optimal_ipm", "rop", "backdoor",
                                                    "adaptive"}


def test_real_and_declared_f_and_the_policy_are_separate(probes):
    res = probes[1]
    assert res["alie-count3"]["real_f"] == 3 and res["alie-count3"]["policy"] == "last_f"
    assert all(b == [7, 8, 9] for b in res["alie-count3"]["byzantine"])
    assert res["alie"]["real_f"] == 2
    assert res["ipm-rotate"]["policy"] == "rotating"
    sets = res["ipm-rotate"]["byzantine"]
    assert all(len(s) == 3 for s in sets) and len(set(map(tuple, sets))) > 1


def test_attacks_see_worker_momentum(probes):
    """With momentum the rows an attack reads (and whose formula holds above) are the vectors
    actually sent, m_1 = beta m_0 + g_1, not the bare gradients: g_1 recomputed here."""
    cfg = cfg_of("alie-momentum")
    res = probes[1]["alie-momentum"]
    ds = data.load(cfg)
    wd = data.WorkerData(ds, cfg, attacks.byzantine_set(cfg, 0))
    model = models.build(cfg, (1, 28, 28), 10)
    flat = torch.nn.utils.parameters_to_vector(model.parameters())
    torch.nn.utils.vector_to_parameters(flat - cfg.train.lr * res["aggregate"][0], model.parameters())
    for w in _honest(res["byzantine"][1])[:3]:
        model.zero_grad()
        x, y = wd.batch_of(w, 1)
        F.cross_entropy(model(x), y).backward()
        g1 = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.allclose(res["rows"][1][w], 0.9 * res["rows"][0][w] + g1, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(res["rows"][1][w], g1, rtol=1e-2, atol=1e-4)


# ---------------------------------------------------------------------------- in process

class ThreadGroup:
    """Ranks as threads, reducing in a chosen rank order (as a real network might)."""

    def __init__(self, world, order):
        self.world, self.order = world, order
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world

    def member(self, rank):
        group = self

        class Member:
            def _reduce(self, t, op):
                group.slots[rank] = t.clone()
                group.barrier.wait()
                acc = group.slots[group.order[0]].clone()
                for r in group.order[1:]:
                    acc = op(acc, group.slots[r])
                group.barrier.wait()
                t.copy_(acc)
                return t

            def all_reduce_max(self, t):
                return self._reduce(t, torch.maximum)

            def all_reduce_sum(self, t):
                return self._reduce(t, torch.add)
        return Member()


def _exact_sum_on(parts, order, terms):
    group = ThreadGroup(len(parts), order)
    out = [None] * len(parts)

    def rank(r):
        out[r] = attacks.exact_sum(parts[r], group.member(r), terms, parts[0][0].numel(), "cpu")

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(parts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(o.view(torch.int64), out[0].view(torch.int64)) for o in out)   # every rank, bit for bit
    return out[0]


def test_exact_sum_is_the_same_for_any_split_and_reduction_order():
    g = torch.Generator().manual_seed(0)
    # magnitudes spread over 2**-40 .. 2**40, the trouble case for float sums
    rows = [torch.randn(257, generator=g) * torch.exp2(torch.randint(-40, 40, (257,), generator=g).float())
            for _ in range(8)]
    one = _exact_sum_on([rows], [0], 8)
    # float partial sums really do depend on the split: the problem being solved
    naive = [sum(rows[:4]) + sum(rows[4:]), sum(rows[:3]) + sum(rows[3:])]
    assert not torch.equal(naive[0], naive[1])
    for split, order in (([2, 2, 2, 2], [3, 1, 0, 2]), ([3, 3, 1, 1], [0, 1, 2, 3]), ([5, 3], [1, 0])):
        parts, start = [], 0
        for k in split:
            parts.append(rows[start:start + k])
            start += k
        assert torch.equal(_exact_sum_on(parts, order, 8), one)
    # and the value is the exact sum up to the fixed-point step: each term is truncated to a
    # multiple of 2**(top - 52 + ceil(log2 n)), top the exponent of the coordinate's largest term,
    # so it errs by less than 2**(ceil(log2 n) - 51) of that term, and nothing is rounded after
    exact = torch.tensor([math.fsum(float(r[j]) for r in rows) for j in range(257)], dtype=torch.float64)
    magnitudes = torch.stack(rows).abs().double()
    largest = magnitudes.amax(0)
    assert ((one - exact).abs() < 8 * largest * 2.0 ** (3 - 51)).all()
    # a float32 term at most 2**(29 - ceil(log2 n)) times smaller than the largest is kept whole:
    # where every term is (as for most coordinates of gradients), the sum is exactly the true sum
    tame = [torch.randn(257, generator=g) for _ in range(8)]
    magnitudes = torch.stack(tame).abs().double()
    whole = magnitudes.amax(0) <= magnitudes.amin(0) * 2.0 ** (29 - 3)
    exact = torch.tensor([math.fsum(float(r[j]) for r in tame) for j in range(257)], dtype=torch.float64)
    assert whole.sum() > 200 and torch.equal(_exact_sum_on([tame], [0], 8)[whole], exact[whole])


def test_exact_sum_marks_non_finite_coordinates_and_handles_empty_ranks():
    a = torch.tensor([1.0, float("inf"), 0.0, 3.0])
    b = torch.tensor([2.0, 1.0, float("nan"), 0.0])
    out = _exact_sum_on([[a], [b], []], [2, 0, 1], 3)
    assert out[0] == 3.0 and out[3] == 3.0 and out[1].isnan() and out[2].isnan()
    zeros = _exact_sum_on([[torch.zeros(3)], []], [0, 1], 2)
    assert torch.equal(zeros, torch.zeros(3, dtype=torch.float64))


class OneProcess:
    """The collectives of one process: the identity."""
    single = True

    def all_reduce_max(self, t):
        return t

    def all_reduce_sum(self, t):
        return t


def _wide_rows():
    """Rows whose magnitudes spread over 2**-30 .. 2**30 per coordinate, with a NaN and an Inf."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(9, 300, generator=g) * torch.exp2(torch.randint(-30, 30, (9, 300), generator=g).float())
    rows[2, 5], rows[4, 7] = math.nan, math.inf
    return rows


def _bits(t):
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


@pytest.mark.parametrize("byzantine", [[7, 8], [1, 5]])   # honest rows consecutive (a view), or not
def test_alie_in_spans_of_columns_is_the_same_bits_as_all_at_once(byzantine, monkeypatch):
    """In one process ALIE computes span by span; across ranks all columns at once. Every step is
    per column, so the bits agree; and they are mean - z std of the honest rows."""
    from byzddp.attacks import base
    sent = []
    for span in (7, 10 ** 6):
        monkeypatch.setattr(base, "SPAN", span)
        rows = _wide_rows()
        ctx = attacks.AttackContext(0, 0, rows, range(9), byzantine, OneProcess(), 9, 2)
        attacks.build("alie", z=1.5).forge(ctx)
        assert torch.equal(_bits(rows[byzantine[0]]), _bits(rows[byzantine[1]]))
        sent.append(rows[byzantine[0]])
    assert torch.equal(_bits(sent[0]), _bits(sent[1]))
    honest = _wide_rows()[[w for w in range(9) if w not in byzantine]].double()
    want = honest.mean(0) - 1.5 * honest.std(0)
    finite = torch.isfinite(want)
    assert finite.sum() == 298 and torch.isnan(sent[0][~finite]).all()
    torch.testing.assert_close(sent[0][finite].double(), want[finite], rtol=2e-6, atol=0.0)


def test_honest_mean_and_std_from_the_extremes_are_the_same_bits():
    """Given the honest max and min, the sums read the rows once: the largest |g| is max(max, -min)
    and the largest (g - mean)**2 is at the max or the min of g (rounding is monotone), which is
    what the first pass over the rows would find, NaN and Inf included."""
    from byzddp.attacks.base import honest_mean, honest_rows, honest_std
    rows = _wide_rows()
    ctx = attacks.AttackContext(0, 0, rows, range(9), [8], OneProcess(), 9, 1)
    cols = slice(0, 300)
    extremes = honest_rows(ctx).extremes(cols)
    mean = honest_mean(ctx)
    assert torch.equal(_bits(honest_mean(ctx, cols, extremes)), _bits(mean))
    assert torch.equal(_bits(honest_std(ctx, mean, cols, extremes)), _bits(honest_std(ctx, mean)))
    assert torch.isnan(mean[[5, 7]]).all() and torch.isfinite(mean).sum() == 298


def test_alie_z_from_n_and_f():
    assert attacks.alie_z(25, 5) == pytest.approx(0.2533, abs=1e-4)
    assert attacks.alie_z(10, 2) == pytest.approx(0.0, abs=1e-12)   # the table's setting: z = 0
    assert attacks.from_config(config.load(None, ["attack.name=alie", "workers.n=25", "workers.byzantine=5"])) \
        .z_for(25, 5) == pytest.approx(0.2533, abs=1e-4)
    assert attacks.from_config(config.load(None, ["attack.name=alie", "attack.z=1.5"])).z_for(25, 5) == 1.5
    assert attacks.build("alie").z_for(10, 0) == 0.0                 # nobody attacks: nothing to derive


def test_search_gamma_finds_the_edge_of_an_interval():
    for edge in (0.3, 7.77, 12.5):
        got = attacks.search_gamma(lambda gamma: gamma <= edge, 10.0, 1e-6)
        assert edge - 2e-6 <= got <= edge
    assert attacks.search_gamma(lambda gamma: True, 10.0, 1e-6) == pytest.approx(20.0, abs=1e-5)
    assert attacks.search_gamma(lambda gamma: gamma <= 0, 10.0, 1e-6) == 0.0


def test_rotating_set_is_keyed_by_seed_and_step():
    cfg = config.load(None, ["attack.name=bitflip", "attack.rotate=true", "workers.n=10", "attack.count=3"])
    sets = [attacks.byzantine_set(cfg, t) for t in range(20)]
    assert all(len(s) == 3 and s == sorted(s) and set(s) <= set(range(10)) for s in sets)
    assert len(set(map(tuple, sets))) > 10                         # a new draw every step
    assert sets == [attacks.byzantine_set(cfg, t) for t in range(20)]
    other = config.load(None, ["attack.name=bitflip", "attack.rotate=true", "workers.n=10", "attack.count=3",
                               "seed=1"])
    assert sets != [attacks.byzantine_set(other, t) for t in range(20)]
    fixed = config.load(None, ["attack.name=bitflip", "workers.n=10", "workers.byzantine=2"])
    assert all(attacks.byzantine_set(fixed, t) == [8, 9] for t in range(5))
    assert attacks.policy(cfg) == "rotating" and attacks.policy(fixed) == "last_f"
    assert attacks.real_f(config.load(None, ["attack.name=none"])) == 0


@pytest.mark.parametrize("overrides, key", [
    (["attack.name=mimicry"], "attack.name"),
    (["attack.count=10"], "attack.count"),
    (["attack.name=minmax", "workers.n=4", "workers.byzantine=1", "attack.count=3"], "attack.count"),
    (["attack.name=alie", "workers.n=3", "workers.byzantine=1", "attack.count=2"], "attack.count"),
    (["attack.name=mimic2"], "data.partition"),
    (["attack.name=mimic", "attack.rotate=true"], "attack.rotate"),
    (["attack.name=mimic", "attack.warmup=0"], "attack.warmup"),
    (["attack.name=stale", "attack.delay=0"], "attack.delay"),
    (["attack.name=gaussian", "attack.sigma=0"], "attack.sigma"),
    (["attack.name=ipm", "attack.epsilon=-0.1"], "attack.epsilon"),
    (["attack.name=alie", "attack.z=.inf"], "attack.z"),
    (["attack.name=alie", "workers.n=6", "workers.byzantine=1", "attack.count=4"], "attack.z"),
    (["attack.name=minsum", "attack.perturbation=cos"], "attack.perturbation"),
    (["attack.name=minmax", "attack.gamma_init=0"], "attack.gamma_init"),
    (["attack.name=minmax", "attack.gamma_tol=20"], "attack.gamma_tol"),
    (["attack.name=fang", "attack.target=krum"], "attack.target"),
    (["attack.name=fang", "attack.target=krum", "aggregator.name=cm"], "attack.target"),
    (["attack.name=fang", "attack.target=trimmed"], "attack.target"),
    (["attack.name=optimal_alie", "attack.search_max=0"], "attack.search_max"),
    (["attack.name=optimal_ipm", "attack.search_max=.inf"], "attack.search_max"),
    (["attack.name=optimal_ipm", "attack.search_evals=2"], "attack.search_evals"),
    (["attack.name=optimal_alie", "workers.n=3", "workers.byzantine=1", "attack.count=2"], "attack.count"),
    (["attack.name=rop", "attack.pi=1.5"], "attack.pi"),
    (["attack.name=rop", "attack.lamb=-0.1"], "attack.lamb"),
    (["attack.name=rop", "attack.angle=.nan"], "attack.angle"),
    (["attack.name=rop", "attack.z=.inf"], "attack.z"),
    (["attack.name=rop", "workers.n=6", "workers.byzantine=1", "attack.count=4"], "attack.z"),
])
def test_bad_attack_settings_name_the_key_in_one_line(overrides, key):
    with pytest.raises(ConfigError) as e:
        config.load(None, ["aggregator.name=mean", "resampling.name=none", *overrides])
    assert key in str(e.value) and "\n" not in str(e.value)


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")   # pytest owns stderr here
def test_cli_reports_a_bad_attack_in_one_line_and_summary_records_the_threat_model(tmp_path, capsys):
    """Through the entry point, in this process (one rank): the error line, then a short run."""
    import signal
    from byzddp import cli
    assert cli.main(["attack.name=mimic2", "data.partition=sorted"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "data.partition=two_groups" in err
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        assert cli.main([*TINY, f"log.dir={tmp_path}", "log.name=r", "workers.byzantine=2", "attack.name=ipm",
                         "attack.count=3", "attack.rotate=true", "aggregator.name=cm",
                         "resampling.name=none"]) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    s = summary(tmp_path / "r")
    assert (s["attack"], s["byzantine_declared"], s["byzantine_real"], s["byzantine_policy"]) == \
        ("ipm", 2, 3, "rotating")
