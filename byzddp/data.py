"""Datasets as in-memory tensors, the partitions that make them non-iid, and worker batches.

A dataset is loaded once per process into tensors (images normalised, labels int64): a
built-in one (byzddp/datasets.py) or a plug-in loader, each named in one table and checked
the same way. A
partition cuts the training set's indices into shards, one per data-holding worker. A batch
is a pure function of (seed, worker, step), so any rank can draw any worker's batch.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from byzddp import plugins, streams
from byzddp.datasets import (Dataset, load_cifar10, load_cifar100, load_emnist, load_fashionmnist, load_mnist,
                             load_mnist5k, load_svhn, load_text)
from byzddp.errors import ConfigError


# ---------------------------------------------------------------------------- loading

def load(cfg) -> Dataset:
    """The dataset of cfg.data, checked as a whole: each split's examples and labels agree in
    number, labels are integers in 0..classes-1, examples are finite floats."""
    name = cfg.data.dataset
    if plugins.is_path(name):
        ds, source = load_plug_in(cfg), f"'{name}'"
    else:
        ds = plugins.resolve("data.dataset", name)(cfg.data)
        source = name if name == "mnist5k" else f"{name} (data.root={cfg.data.root})"
    check(ds, source)
    return ds


def check(ds: Dataset, source: str) -> None:
    """One line naming data.dataset where the splits do not hold up: torchvision reads IDX
    files of 100 images and 90 labels, or labels of 200, without a word, and a plug-in's data
    may hold NaN/Inf. A bad example is named by its split and first index."""
    fix = "replace the files" if "data.root" in source else "fix the loader"
    for split, x, y in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
        if len(x) != len(y) or len(y) == 0:
            raise ConfigError(f"config key data.dataset: {source} has {len(x)} {split} examples but {len(y)} "
                              f"labels; {fix} so that they match")
        sequences = x.dtype == torch.long and y.shape == x.shape     # text: token ids, next tokens
        if not (x.is_floating_point() or sequences) or y.dtype != torch.long or (y.dim() != 1 and not sequences):
            raise ConfigError(f"config key data.dataset: {source} {split} set must be float examples and "
                              f"int64 labels (N,); got {x.dtype} and {y.dtype} {tuple(y.shape)}; {fix}")
        for what, t in (("labels", y), ("tokens", x)) if sequences else (("labels", y),):
            low, high = int(t.min()), int(t.max())
            if low < 0 or high >= ds.num_classes:
                raise ConfigError(f"config key data.dataset: {source} has {split} {what} in [{low}, {high}], "
                                  f"outside 0..{ds.num_classes - 1}; {fix}")
        if sequences:
            continue
        finite = torch.isfinite(x.reshape(len(x), -1)).all(1)
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0, 0])
            raise ConfigError(f"config key data.dataset: {source} {split} example {first} holds NaN or Inf "
                              f"({int((~finite).sum())} such examples); {fix} (drop or clean them)")


def validate(cfg) -> None:
    """A plug-in loader must import, be callable and take data.args' types; built-in datasets
    take no data.args."""
    loader = plugins.resolve("data.dataset", cfg.data.dataset)
    plugins.check_args("data.dataset", cfg.data.dataset, cfg.data.args, loader)
    if not plugins.is_path(cfg.data.dataset) and cfg.data.classes is not None:
        raise ConfigError(f"config key data.classes: only a plug-in dataset takes it; "
                          f"{cfg.data.dataset} knows its classes (remove data.classes)")


def load_plug_in(cfg) -> Dataset:
    """loader(root=data.root, **data.args) -> (train, test), each a pair of tensors (x, y) or a
    torch Dataset of (x, y) items; held in memory like the built-in datasets. Classes: data.classes,
    else the loader's train set's `classes` attribute (torchvision's), else max label + 1."""
    name = cfg.data.dataset
    splits = plugins.call("data.dataset", name, plugins.resolve("data.dataset", name), "root and data.args",
                          root=cfg.data.root, **cfg.data.args)
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


# The built-in datasets, each a loader of cfg.data; a plug-in is loader(root=..., **data.args).
plugins.register(
    "data.dataset", "dataset", "loader",
    {"mnist5k": lambda d: load_mnist5k(d.test_size, d.split),
     "mnist": lambda d: load_mnist(d.root, d.download),
     "fashionmnist": lambda d: load_fashionmnist(d.root, d.download),
     "emnist": lambda d: load_emnist(d.root, d.download),
     "cifar10": lambda d: load_cifar10(d.root, d.download),
     "cifar100": lambda d: load_cifar100(d.root, d.download),
     "svhn": lambda d: load_svhn(d.root, d.download),
     "text": lambda d: load_text(d.root, d.block_size)},
    "a callable returning (train, test)", callable)


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
        if shards > 1 and bool((share == share[0]).all()):
            # Every float32 gamma draw underflowed and was clamped alike: an even split, the
            # opposite of what a small alpha asks for (a true draw is never exactly even).
            raise ConfigError(f"config key data.alpha: {alpha:g} is too small for the float32 Dirichlet draw "
                              f"(class {c}'s shares underflowed to an even split); raise data.alpha "
                              f"(0.01 and above draw safely)")
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
