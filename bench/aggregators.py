"""Milliseconds per robust rule on an (n, d) float32 tensor, against the plain torch kernel
that computes the same thing exactly and against ByzFL 0.0.11 when it is importable.

    OMP_NUM_THREADS=1 nice python bench/aggregators.py --n 25 128 --d 1.2e6 1e6 --pairs
    python bench/aggregators.py [--device cpu|cuda] [--n 8 32 128] [--d 1e5 1e6 1e7]
                                [--repeat K] [--quick] [--resampling] [--variants] [--pairs]

The plain kernels: mean vs torch.mean(dim=0); cm vs the fastest of torch.median(dim=0) (odd n),
the kthvalue(s) of the middle rank(s) and torch.sort(dim=0); trimmed_mean vs torch.sort(dim=0)
and the mean of the kept ranks; krum and multikrum vs one float64 Gram matmul x x^T; rfa and
cclip vs that matmul plus one (1 x n)(n x d) product (they need both passes); bulyan vs the
matmul plus torch.sort of the theta selected rows. ByzFL (installed apart, e.g. `pip install
--no-deps --target /tmp/byzfl byzfl==0.0.11`, found there or on sys.path) runs its Average,
Median, TrMean, Krum, MultiKrum, GeometricMedian (T=8) and CenteredClipping (L=3) on the same
tensor; its Median is torch.quantile, which refuses tensors over 2^24 entries.
--pairs times the (n, d) pairs n[i], d[i] instead of the grid.

Prints markdown tables: the median of K timed calls after one warm-up call, per rule, for
every (n, d) that fits in memory (an estimate: the raw sort holds the input, its sorted values
and int64 indices, about 4 copies; combinations over 60% of the free memory are skipped).
f = (n-3)//4 for the rules that take it, so that Bulyan's 4f+3 <= n holds.
--resampling adds a table for the pre-aggregations; --variants times alternative exact
implementations of the coordinate-wise rules (how cm and trimmed_mean were chosen).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from byzddp import aggregators, resampling, streams  # noqa: E402


def load_byzfl():
    """ByzFL's aggregators module, or None. Its package __init__ pulls in plotting libraries the
    aggregators do not need, so the package is registered by path and only that module loaded."""
    import importlib
    import types
    for root in ["/tmp/byzfl", *sys.path]:
        pkg = Path(root) / "byzfl"
        if (pkg / "aggregators" / "aggregators.py").is_file():
            if "byzfl" not in sys.modules:
                module = types.ModuleType("byzfl")
                module.__path__ = [str(pkg)]
                sys.modules["byzfl"] = module
            try:
                return importlib.import_module("byzfl.aggregators.aggregators")
            except Exception as e:  # noqa: BLE001 - the comparison is optional
                print(f"ByzFL not usable: {e}", file=sys.stderr)
                return None
    return None


def byzfl_rules(B, n: int) -> dict:
    f = max((n - 3) // 4, 0)
    return {"mean": B.Average(), "cm": B.Median(), "trimmed_mean": B.TrMean(f=f), "krum": B.Krum(f=f),
            "multikrum": B.MultiKrum(f=f), "rfa (T=8)": B.GeometricMedian(nu=0.1, T=8),
            "cclip (L=3)": B.CenteredClipping(L=3, tau=10.0)}


def plain_kernels(n: int) -> dict:
    """For each rule, the exact plain torch computations it is measured against (the fastest wins)."""
    f = max((n - 3) // 4, 0)
    lo, hi = (n - 1) // 2, n // 2
    theta = max(n - 2 * f, 1)

    def gram(x):
        xd = x.double()
        return xd @ xd.T

    def median_by_kthvalue(x):
        top = torch.kthvalue(x, hi + 1, dim=0).values
        return top if lo == hi else (torch.kthvalue(x, lo + 1, dim=0).values + top) / 2

    def median_by_sort(x):
        s = torch.sort(x, dim=0).values
        return (s[lo] + s[hi]) / 2

    w = torch.full((n,), 1.0 / n)
    cm = {"kthvalue": median_by_kthvalue, "sort": median_by_sort}
    if lo == hi:
        cm = {"median": lambda x: torch.median(x, dim=0).values, **cm}
    gram_and_sum = {"gram + w@x": lambda x: (gram(x), w.to(x.device) @ x)}
    return {
        "mean": {"mean": lambda x: x.mean(dim=0)},
        "cm": cm,
        "trimmed_mean": {"sort": lambda x: torch.sort(x, dim=0).values[f:n - f].mean(dim=0)},
        "krum": {"gram": gram}, "multikrum": {"gram": gram},
        "rfa (T=8)": gram_and_sum, "cclip (L=3)": gram_and_sum,
        "bulyan": {"gram + sort": lambda x: (gram(x), torch.sort(x[:theta], dim=0).values)},
    }


def comparison(x, device, repeat: int, B) -> list:
    """Rows (rule, ours, plain kernel, its ms, ratio, byzfl ms, ratio) for one tensor. Each rule,
    its plain kernels and ByzFL's version are called in turn, `repeat` rounds after a warm-up
    round, so that a change in the machine's load hits all of them alike; medians are reported."""
    n = x.shape[0]
    # The training step's path: rule.aggregate, which reads nothing back from the device
    # (rule(x) adds one isfinite(out).all() check over d for NonFiniteError).
    ours = {label: rule.aggregate for label, rule in rules_for(n).items()}
    theirs = byzfl_rules(B, n) if B is not None else {}
    out = []
    for label, kernels in plain_kernels(n).items():
        calls = {"ours": ours[label], **kernels}
        failed = None
        if label in theirs:
            try:
                theirs[label](x)
                calls["byzfl"] = theirs[label]
            except (RuntimeError, ValueError) as e:
                failed = f"fails: {str(e).splitlines()[0][:48]}"
        times = {k: [] for k in calls}
        for round_ in range(repeat + 1):
            for k, fn in calls.items():
                t = timed(fn, x, device, 1) if round_ else (fn(x), 0.0)[1]
                if round_:
                    times[k].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = min(kernels, key=med.get)
        byz = med.get("byzfl")
        out.append((label, f"{med['ours']:.0f}", best, f"{med[best]:.0f}", f"{med['ours'] / med[best]:.2f}",
                    f"{byz:.0f}" if byz else (failed or "n/a"), f"{med['ours'] / byz:.2f}" if byz else "-"))
        print(f"  {label}: {out[-1]}", file=sys.stderr, flush=True)
    return out


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def timed(fn, x, device, repeat: int) -> float:
    """Median milliseconds of `repeat` calls of fn(x), after one warm-up call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn(x)
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(x)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rules_for(n: int) -> dict:
    f = max((n - 3) // 4, 0)
    return {
        "mean": aggregators.build("mean"),
        "krum": aggregators.build("krum", f=f),
        "multikrum": aggregators.build("multikrum", f=f),
        "cm": aggregators.build("cm", f=f),
        "trimmed_mean": aggregators.build("trimmed_mean", f=f),
        "rfa (T=8)": aggregators.build("rfa", f=f, T=8),
        "cclip (L=3)": aggregators.build("cclip", f=f, L=3),
        "bulyan": aggregators.build("bulyan", f=f),
    }


def resamplers_for(n: int) -> dict:
    f = max((n - 3) // 4, 0)
    g = streams.generator("resampling", 0, 0)
    out = {}
    for name in ("s_replacement", "bucketing", "with_replacement", "nnm"):
        r = resampling.build(name, s=2, f=f)
        out[f"{name}" + ("" if name == "nnm" else " (s=2)")] = (lambda x, r=r: r(x, g))
    return out


# Alternative exact implementations of the coordinate-wise rules, for --variants.

def cm_by_sort(x):
    n = x.shape[0]
    s = torch.sort(x, dim=0).values
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def cm_by_sort_transposed(x):
    n = x.shape[0]
    s = torch.sort(x.T.contiguous(), dim=1).values
    return (s[:, (n - 1) // 2] + s[:, n // 2]) / 2


def cm_by_topk(x):
    # topk orders NaN above +Inf, like sort.
    n = x.shape[0]
    low = torch.topk(x, n // 2 + 1, dim=0, largest=False, sorted=False).values
    if n % 2:
        return low.max(dim=0).values
    two = torch.topk(low, 2, dim=0).values
    return (two[0] + two[1]) / 2


def cm_by_kthvalue(x):
    n = x.shape[0]
    hi = torch.kthvalue(x, n // 2 + 1, dim=0).values
    return hi if n % 2 else (torch.kthvalue(x, n // 2, dim=0).values + hi) / 2


def trimmed_by_sort(x, b):
    n = x.shape[0]
    return torch.sort(x, dim=0).values[b:n - b].mean(dim=0)


def trimmed_by_topk(x, b):
    n = x.shape[0]
    kept = torch.topk(x, n - b, dim=0, largest=False, sorted=False).values
    return torch.topk(kept, n - 2 * b, dim=0, sorted=False).values.mean(dim=0)


def variants_for(n: int) -> dict:
    b = max((n - 3) // 4, 0)
    return {"cm: sort": cm_by_sort, "cm: sort (d, n)": cm_by_sort_transposed, "cm: topk": cm_by_topk,
            "cm: kthvalue": cm_by_kthvalue,
            "trimmed: sort": lambda x: trimmed_by_sort(x, b),
            "trimmed: topk": lambda x: trimmed_by_topk(x, b)}


def table(title: str, columns: list, rows: list) -> str:
    head = f"\n{title}\n\n| n | d | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 2)
    return head + "".join(f"\n| {n} | {d:.0e} | " + " | ".join(cells) + " |" for n, d, cells in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--d", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="n in {8, 32}, d in {1e5, 1e6}, 3 repeats")
    p.add_argument("--resampling", action="store_true", help="also time the pre-aggregations")
    p.add_argument("--variants", action="store_true", help="also time alternative cm / trimmed_mean kernels")
    p.add_argument("--pairs", action="store_true", help="time (n[i], d[i]) pairs against the plain kernels and ByzFL")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.repeat = [8, 32], [1e5, 1e6], 3
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; float32 inputs; median of {args.repeat} calls, ms")
    if args.pairs:
        B = load_byzfl()
        print(f"ByzFL: {'0.0.11 from ' + str(Path(B.__file__).parents[2]) if B else 'not installed'}")
        for n, d in zip(args.n, (int(v) for v in args.d)):
            x = torch.randn(n, d, device=device, generator=torch.Generator(device).manual_seed(0))
            print(f"\nn = {n}, d = {d:,}\n\n| rule | ours ms | plain kernel | its ms | ours / plain | "
                  f"ByzFL ms | ours / ByzFL |\n|---|---|---|---|---|---|---|")
            for row in comparison(x, device, args.repeat, B):
                print("| " + " | ".join(row) + " |", flush=True)
            del x
        return 0

    main_rows, res_rows, var_rows, columns, res_columns, var_columns = [], [], [], [], [], []
    for n in args.n:
        for d in (int(v) for v in args.d):
            need = 4 * n * d * 4
            if need > 0.6 * free_bytes(device):
                print(f"skip n={n} d={d:.0e}: needs about {need / 2**30:.1f} GiB")
                continue
            x = torch.randn(n, d, device=device, generator=torch.Generator(device).manual_seed(0))
            cells = {"sort(dim=0)": timed(lambda t: torch.sort(t, dim=0), x, device, args.repeat)}
            for label, rule in rules_for(n).items():
                cells[label] = timed(rule, x, device, args.repeat)
            columns = list(cells)
            main_rows.append((n, d, [f"{v:.1f}" for v in cells.values()]))
            if args.resampling:
                res = {label: timed(fn, x, device, args.repeat) for label, fn in resamplers_for(n).items()}
                res_columns = ["mean", *res]
                res_rows.append((n, d, [f"{v:.1f}" for v in [cells["mean"], *res.values()]]))
            if args.variants:
                var = {"sort(dim=0)": cells["sort(dim=0)"], "cm (library)": cells["cm"],
                       "trimmed (library)": cells["trimmed_mean"]}
                for label, fn in variants_for(n).items():
                    var[label] = timed(fn, x, device, args.repeat)
                var_columns = list(var)
                var_rows.append((n, d, [f"{v:.1f}" for v in var.values()]))
            print(f"done n={n} d={d:.0e}", file=sys.stderr, flush=True)
            del x
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if main_rows:
        print(table("Robust rules (f = (n-3)//4)", columns, main_rows))
    if res_rows:
        print(table("Pre-aggregation (s = 2)", res_columns, res_rows))
    if var_rows:
        print(table("Coordinate-wise kernels", var_columns, var_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
