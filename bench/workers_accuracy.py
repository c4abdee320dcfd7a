"""Loop against vectorized workers over a whole run: the default config (MNIST-5k, mlp, 10
workers, 2 bitflip, cm after s-replacement) for 300 steps, same seed; prints markdown rows.

    python bench/workers_accuracy.py                   # 300 steps, seeds 0
    python bench/workers_accuracy.py --steps 600 --seeds 0,1,2 model.name=cnn

The two runs differ only in float rounding (vmap's batched kernels against one worker at a
time), so their accuracies should agree within about a point.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print("| seed | mode | final test accuracy | mean of last 5 | wall s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds.split(","):
            for vec in ("false", "true"):
                name = f"s{seed}-{vec}"
                cmd = [sys.executable, "train.py", f"train.steps={args.steps}", f"seed={seed}",
                       f"workers.vectorize={vec}", "log.progress=false", "train.checkpoint_every=0",
                       f"log.dir={tmp}", f"log.name={name}", *args.overrides]
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
                s = json.loads((Path(tmp) / name / "summary.json").read_text())
                mode = "vectorized" if vec == "true" else "loop"
                print(f"| {seed} | {mode} | {100 * s['final_test_accuracy']:.2f} | "
                      f"{100 * s['final_test_accuracy_last5']:.2f} | {s['wall_seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
