"""Final accuracy of `mean` and `cm` under every attack: does each attack bite?

MNIST-5k, the paper's non-iid split (sorted by label), 10 workers of which the last 2 are
Byzantine, 600 steps of the default MLP, no resampling (the bare rules). mimic2 needs its own
partition (two groups sharing data), so it runs on data.partition=two_groups and has its own
no-attack row. Every run is a plain `python train.py` run under <out>/<rule>-<attack>; runs
that already have a summary.json are reused unless --fresh.

    python bench/attack_table.py --jobs 2
    python bench/attack_table.py --rules mean,cm,rfa --resampling s_replacement --steps 300

Prints a markdown table (also written to <out>/attack_table.md): the mean of the last five
test accuracies (the paper's metric), in percent; "stopped" where a non-finite aggregate
stopped the run (the rule let NaN/Inf through).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (row label, overrides, what the row shows)
ROWS = [
    ("none", ["attack.name=none"], "no attack"),
    ("bitflip", ["attack.name=bitflip"], "send -g"),
    ("labelflip", ["attack.name=labelflip"], "train on 9 - y"),
    ("gaussian", ["attack.name=gaussian"], "N(0, 200^2 I)"),
    ("nm", ["attack.name=nm"], "-sum g_i/||g_i||"),
    ("mimic", ["attack.name=mimic"], "copy one honest worker (warm-up 1)"),
    ("alie", ["attack.name=alie"], "mu - z sigma (z from n, f: 0 here)"),
    ("ipm", ["attack.name=ipm"], "-0.1 mean"),
    ("minmax", ["attack.name=minmax"], "mean - gamma std, max distance bound"),
    ("minsum", ["attack.name=minsum"], "mean - gamma std, sum of distances bound"),
    ("nan", ["attack.name=nan"], "NaN vector"),
    ("inf", ["attack.name=inf"], "+Inf vector"),
    ("zero", ["attack.name=zero"], "zeros (crashed)"),
    ("stale", ["attack.name=stale"], "own gradient of 10 steps ago"),
    ("none-two-groups", ["attack.name=none", "data.partition=two_groups"], "no attack, two groups"),
    ("mimic2", ["attack.name=mimic2", "data.partition=two_groups"], "copy group one (two groups)"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rules", default="mean,cm", help="comma-separated aggregator names")
    p.add_argument("--attacks", default=",".join(r[0] for r in ROWS), help="comma-separated row labels")
    p.add_argument("--resampling", default="none")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time (one CPU thread each)")
    p.add_argument("--out", default=str(ROOT / "runs" / "attack_table"))
    p.add_argument("--fresh", action="store_true", help="rerun runs that already have a summary")
    p.add_argument("overrides", nargs="*", help="extra dotted.key=value for every run")
    return p.parse_args(argv)


def run_one(args, rule: str, label: str, overrides: list) -> dict:
    name = f"{rule}-{label}"
    run_dir = Path(args.out) / name
    if not args.fresh and (run_dir / "summary.json").is_file():
        return {"summary": json.loads((run_dir / "summary.json").read_text())}
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "default.yaml"),
           "data.dataset=mnist5k", "data.partition=sorted", "workers.n=10", "workers.byzantine=2",
           f"aggregator.name={rule}", f"resampling.name={args.resampling}", f"train.steps={args.steps}",
           f"seed={args.seed}", f"log.dir={args.out}", f"log.name={name}", "log.progress=false",
           *overrides, *args.overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode == 0:
        return {"summary": json.loads((run_dir / "summary.json").read_text())}
    step = re.search(r"aggregate at step (\d+) was not finite", proc.stderr)
    if step:
        return {"stopped": int(step.group(1))}
    print(f"{name} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}", file=sys.stderr, flush=True)
    return {"failed": proc.returncode}


def cell(result: dict) -> str:
    if "stopped" in result:
        return f"stopped (non-finite, step {result['stopped']})"
    if "failed" in result:
        return f"failed (exit {result['failed']})"
    return f"{100 * result['summary']['final_test_accuracy_last5']:.1f}"


def table(args, rules, rows, results) -> str:
    lines = [f"| attack | what it sends | {' | '.join(rules)} |", "|---|---|" + "---|" * len(rules)]
    for label, _, what in rows:
        lines.append(f"| {label} | {what} | " + " | ".join(cell(results[rule, label]) for rule in rules) + " |")
    lines.append("")
    lines.append(f"mnist5k, sorted non-iid, 10 workers, last 2 Byzantine, {args.steps} steps, "
                 f"resampling={args.resampling}, seed {args.seed}; mean of the last 5 test accuracies (%).")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    rules = args.rules.split(",")
    wanted = args.attacks.split(",")
    unknown = sorted(set(wanted) - {r[0] for r in ROWS})
    if unknown:
        print(f"error: unknown attack row(s) {', '.join(unknown)}; choose from "
              f"{', '.join(r[0] for r in ROWS)}", file=sys.stderr)
        return 2
    rows = [r for r in ROWS if r[0] in wanted]
    jobs = [(rule, label, overrides) for label, overrides, _ in rows for rule in rules]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {(rule, label): pool.submit(run_one, args, rule, label, overrides)
                   for rule, label, overrides in jobs}
        results = {key: future.result() for key, future in futures.items()}
    text = table(args, rules, rows, results)
    out = Path(args.out) / "attack_table.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(text + "\n")
    os.replace(tmp, out)
    print(text)
    return 1 if any("failed" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
