"""Run on several ranks by tests/test_ddp.py: a plain DDP loop with byzddp.ddp.register, checked
against DDP's own all-reduce and against the rules applied by hand to the gathered gradients.

Usage (torchrun's environment variables set): python tests/ddp_probe.py OUT.pt CASES.json
Rank 0 saves {case name: {"errors": [per-step relative error], "checksums": (world, 2), ...}}.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from byzddp import ddp as robust, streams  # noqa: E402
from byzddp.errors import ConfigError  # noqa: E402


class Net(nn.Module):
    """Two layers, and a branch that only some steps use (find_unused_parameters)."""

    def __init__(self, hidden=256):
        super().__init__()
        self.fc1, self.fc2, self.side = nn.Linear(8, hidden), nn.Linear(hidden, 4), nn.Linear(hidden, 4)

    def forward(self, x, use_side=False):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h) + (self.side(h) if use_side else 0)


def batch(rank, step, micro):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(12, 8, generator=g), torch.randint(0, 4, (12,), generator=g)


def flat_grads(params):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def all_rows(v):
    out = [torch.empty_like(v) for _ in range(dist.get_world_size())]
    dist.all_gather(out, v)
    return torch.stack(out)


# ------------------------------------------------------------------ the rules and attacks, by hand

def cm(rows):
    s = rows.sort(0).values
    m = rows.shape[0]
    return s[m // 2] if m % 2 else (s[m // 2 - 1] + s[m // 2]) / 2


def krum(rows, f):
    x = rows.double()
    m = x.shape[0]
    dist2 = torch.tensor([[float(((x[i] - x[j]) ** 2).sum()) for j in range(m)] for i in range(m)])
    scores = [sorted(dist2[i, j] for j in range(m) if j != i)[:m - f - 2] for i in range(m)]
    best = min(range(m), key=lambda i: (sum(scores[i]), i))
    return rows[best]


def by_hand(case, rows, step):
    rows = rows.clone()
    byz = case.get("byzantine_ranks", [])
    honest = [r for r in range(rows.shape[0]) if r not in byz]
    attack, args = case.get("attack", "none"), case.get("attack_args", {})
    for b in byz:
        if attack == "bitflip":
            rows[b] = -rows[b]
        elif attack == "alie":
            h = rows[honest].double()
            rows[b] = (h.mean(0) - args["z"] * h.std(0)).float()
        elif attack == "ipm":
            rows[b] = (-args.get("epsilon", 0.1) * rows[honest].double().mean(0)).float()
        elif attack == "gaussian":
            rows[b] = torch.randn(rows.shape[1], generator=streams.generator("gaussian", 0, b, step)) * args["sigma"]
    pre, n = case.get("pre", "none"), rows.shape[0]
    if pre == "bucketing":      # a permutation keyed by (seed, step), cut into groups of s, averaged
        perm = torch.randperm(n, generator=streams.generator("resampling", 0, step))
        rows = torch.stack([rows[perm[i:i + case["s"]]].mean(0) for i in range(0, n, case["s"])])
    elif pre == "nnm":          # each row the mean of its n-f nearest rows (itself included)
        x = rows.double()
        near = [sorted(range(n), key=lambda j: (float(((x[i] - x[j]) ** 2).sum()), j))[:n - case["f"]]
                for i in range(n)]
        rows = torch.stack([rows[idx].mean(0) for idx in near])
    rule = case.get("rule", "mean")
    if rule == "mean":
        return rows.mean(0)
    if rule == "cm":
        return cm(rows)
    if rule == "krum":
        return krum(rows, case.get("f", 0))
    if rule == "cclip":     # the centre carried over from the previous step's aggregate
        tau, c = case["rule_args"]["tau"], case["centre"]
        c = torch.zeros(rows.shape[1], dtype=torch.float64) if c is None else c
        for _ in range(3):
            v = rows.double() - c
            c = c + (v * (tau / v.norm(dim=1, keepdim=True)).clamp(max=1)).mean(0)
        case["centre"] = c
        return c.float()
    raise ValueError(rule)


# ------------------------------------------------------------------ one case

def run(case):
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = Net(case.get("hidden", 256))
    model = DDP(net, bucket_cap_mb=case.get("bucket_mb", 0.004), find_unused_parameters=case.get("unused", False))
    kwargs = {k: case[k] for k in ("rule", "f", "byzantine_ranks", "attack", "attack_args", "pre", "s",
                                   "allow_unsafe") if k in case}
    hook = robust.register(model, **kwargs, **case.get("rule_args", {})) if case.get("register", True) else None
    case["centre"] = None
    params = list(net.parameters())
    errors, grads = [], []
    accum = case.get("accum", 1)
    for step in range(case.get("steps", 3)):
        use_side = step % 2 == 1 if case.get("unused", False) else True
        # By hand: this rank's gradient summed over the micro-batches (as .backward accumulates).
        local = torch.zeros(sum(p.numel() for p in params))
        for k in range(accum):
            x, y = batch(rank, step, k)
            g = torch.autograd.grad(F.cross_entropy(net(x, use_side), y), params, allow_unused=True)
            local += torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(g, params)])
        expected = by_hand(case, all_rows(local), step)
        # With DDP: accumulate under no_sync, the last micro-batch syncs.
        for k in range(accum):
            x, y = batch(rank, step, k)
            if k < accum - 1:
                with model.no_sync():
                    F.cross_entropy(model(x, use_side), y).backward()
            else:
                F.cross_entropy(model(x, use_side), y).backward()
        got = flat_grads(params)
        grads.append(got.clone())
        errors.append(float((got - expected).norm() / expected.norm().clamp_min(1e-30)))
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= 0.1 * p.grad
                p.grad = None
    return {"errors": errors, "grads": torch.stack(grads), "checksums": all_rows(robust.parameter_checksum(net)),
            "mode": hook.mode if hook else "default"}


def refusal(kwargs):
    model = DDP(Net())
    try:
        robust.register(model, **kwargs)
    except ConfigError as e:
        return str(e)
    return ""


def main():
    out, spec = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    dist.init_process_group("gloo")
    results = {name: run(case) for name, case in spec.get("cases", {}).items()}
    refusals = {name: refusal(kwargs) for name, kwargs in spec.get("refusals", {}).items()}
    if dist.get_rank() == 0:
        torch.save({"world": dist.get_world_size(), "results": results, "refusals": refusals}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
