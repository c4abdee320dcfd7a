"""The model's bits of a set of configs, on 1 and 2 ranks: what a refactor must not change.

    OMP_NUM_THREADS=1 python bench/same_bits.py > before.txt      # on the commit before
    OMP_NUM_THREADS=1 python bench/same_bits.py > after.txt       # on the change
    diff before.txt after.txt                                     # empty: the same bits

Each line is `name ranks model_sha256`. The runs are short (train.steps=12) so that the whole
table takes a few minutes on 2 CPU cores; every config still crosses an evaluation, a
checkpoint and, for local steps, several rounds.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHORT = ["train.steps=12", "train.eval_every=6", "train.checkpoint_every=6", "log.progress=false",
         "data.test_size=200"]

CONFIGS = {
    "default": [],
    "krum+bucketing": ["aggregator.name=krum", "resampling.name=bucketing", "workers.n=13",
                       "aggregator.allow_unsafe=true", "attack.name=alie"],
    "cclip+momentum": ["aggregator.name=cclip", "workers.momentum=0.9", "attack.name=ipm"],
    "local+participation+backdoor": ["train.local_steps=3", "workers.participation=0.8",
                                     "attack.name=backdoor", "resampling.name=none"],
    "fltrust": ["aggregator.name=fltrust", "resampling.name=none", "attack.name=ipm"],
    "dnc+rotation": ["aggregator.name=dnc", "attack.rotate=true", "resampling.name=none",
                     "attack.name=alie"],
    "optimal_alie": ["attack.name=optimal_alie", "attack.search_evals=6"],
    "cnn-one-by-one": ["model.name=cnn", "workers.vectorize=false", "train.batch_size=8"],
    "signguard+nnm+dirichlet": ["aggregator.name=signguard", "resampling.name=nnm",
                                "data.partition=dirichlet", "data.alpha=0.5", "attack.name=mimic"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha(args, nproc: int, out: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "train.py"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "train.py"]
    name = f"bits-{nproc}"
    proc = subprocess.run([*cmd, *SHORT, *args, f"log.dir={out}", f"log.name={name}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return f"failed({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
    return json.loads((out / name / "summary.json").read_text())["model_sha256"]


def main() -> None:
    only = sys.argv[1:]
    for name, args in CONFIGS.items():
        if only and name not in only:
            continue
        for nproc in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                print(name, nproc, sha(args, nproc, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
