"""fashionmnist, emnist, cifar100 and svhn through torchvision, on tiny files in the real formats.

Nothing here downloads: every loader runs with download=False on files written under tmp_path
in the layout torchvision 0.29 reads.
"""
import pickle
import struct
from types import SimpleNamespace

import numpy as np
import pytest

from byzddp import data, datasets
from byzddp.config import ConfigError

from helpers import train


def _write_idx(path, array, magic):
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic))
        for dim in array.shape:
            fh.write(struct.pack(">I", dim))
        fh.write(array.astype(np.uint8).tobytes())


def _write_fashionmnist(root, n_train=12, n_test=6):
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images = {"train": rng.integers(0, 256, (n_train, 28, 28)), "t10k": rng.integers(0, 256, (n_test, 28, 28))}
    labels = {"train": np.arange(n_train) % 10, "t10k": (np.arange(n_test) * 3) % 10}
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images[split], 2051)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels[split], 2049)
    return images, labels


def test_fashionmnist_loader_reads_idx_files(tmp_path):
    images, labels = _write_fashionmnist(tmp_path)
    ds = datasets.load_fashionmnist(str(tmp_path), download=False)
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.test_x.shape == (6, 1, 28, 28)
    assert ds.train_y.tolist() == labels["train"].tolist() and ds.test_y.tolist() == labels["t10k"].tolist()
    assert ds.num_classes == 10 and not ds.augment
    expect = (images["train"][3] / 255.0 - 0.2860) / 0.3530
    assert np.allclose(ds.train_x[3, 0].numpy(), expect, atol=1e-5)
    expect = (images["t10k"][5, 20, 2] / 255.0 - 0.2860) / 0.3530
    assert abs(ds.test_x[5, 0, 20, 2].item() - expect) < 1e-5


def test_emnist_balanced_loader_returns_upright_images(tmp_path):
    # torchvision 0.29: <root>/EMNIST/raw/emnist-<split>-<train|test>-<images-idx3|labels-idx1>-ubyte
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(2)
    upright = {"train": rng.integers(0, 256, (5, 28, 28)), "test": rng.integers(0, 256, (3, 28, 28))}
    upright["train"][0] = 0
    upright["train"][0, 2, 20] = 255          # one bright pixel in row 2, column 20: not symmetric
    labels = {"train": np.array([0, 46, 10, 23, 5]), "test": np.array([46, 1, 0])}
    for split in ("train", "test"):
        # the EMNIST files store each image transposed
        _write_idx(raw / f"emnist-balanced-{split}-images-idx3-ubyte", upright[split].transpose(0, 2, 1), 2051)
        _write_idx(raw / f"emnist-balanced-{split}-labels-idx1-ubyte", labels[split], 2049)
    ds = datasets.load_emnist(str(tmp_path), download=False)
    assert ds.train_x.shape == (5, 1, 28, 28) and ds.test_x.shape == (3, 1, 28, 28)
    assert ds.num_classes == 47 and not ds.augment
    assert ds.train_y.tolist() == labels["train"].tolist() and ds.test_y.tolist() == labels["test"].tolist()
    bright = (1.0 - datasets.EMNIST_MEAN) / datasets.EMNIST_STD
    dark = (0.0 - datasets.EMNIST_MEAN) / datasets.EMNIST_STD
    assert abs(ds.train_x[0, 0, 2, 20].item() - bright) < 1e-5      # upright: row 2, column 20
    assert abs(ds.train_x[0, 0, 20, 2].item() - dark) < 1e-5        # not where the file has it
    expect = (upright["test"][1] / 255.0 - datasets.EMNIST_MEAN) / datasets.EMNIST_STD
    assert np.allclose(ds.test_x[1, 0].numpy(), expect, atol=1e-5)


def test_cifar100_loader_reads_fine_labels(tmp_path, monkeypatch):
    import torchvision.datasets.cifar
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(3)
    written = {}
    for name, n in (("train", 4), ("test", 3)):
        x = rng.integers(0, 256, (n, 3 * 32 * 32)).astype(np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        written[name] = (x, fine)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": x, "fine_labels": fine, "coarse_labels": [f % 20 for f in fine]}, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"c{i}" for i in range(20)]}, fh)
    # The real archive's MD5 sums cannot match files written here; everything else is torchvision's.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    ds = datasets.load_cifar100(str(tmp_path), download=False)
    assert ds.train_x.shape == (4, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    assert ds.train_y.tolist() == written["train"][1] and ds.test_y.tolist() == written["test"][1]
    assert ds.num_classes == 100 and ds.augment
    pixel = written["train"][0][2].reshape(3, 32, 32)[:, 9, 30] / 255.0
    expect = (pixel - np.array([0.5071, 0.4865, 0.4409])) / np.array([0.2673, 0.2564, 0.2762])
    assert np.allclose(ds.train_x[2, :, 9, 30].numpy(), expect, atol=1e-5)


def test_svhn_loader_reads_mat_files_and_maps_10_to_0(tmp_path, monkeypatch):
    import scipy.io
    import torchvision.datasets.svhn
    rng = np.random.default_rng(4)
    written = {}
    for split, y in (("train", [10, 1, 9, 5]), ("test", [3, 10])):
        # SVHN's layout: X (32, 32, 3, N) uint8 (row, column, channel, example); y (N, 1), 10 = digit 0
        x = rng.integers(0, 256, (32, 32, 3, len(y))).astype(np.uint8)
        written[split] = x
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": np.array(y, dtype=np.uint8).reshape(-1, 1)})
    # The real files' MD5 sums cannot match files written here; everything else is torchvision's.
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda *args: True)
    ds = datasets.load_svhn(str(tmp_path), download=False)
    assert ds.train_x.shape == (4, 3, 32, 32) and ds.test_x.shape == (2, 3, 32, 32)
    assert ds.train_y.tolist() == [0, 1, 9, 5] and ds.test_y.tolist() == [3, 0]
    assert ds.num_classes == 10 and not ds.augment
    assert ds.train_x.is_contiguous()
    pixel = written["train"][4, 27, :, 2] / 255.0          # row 4, column 27 of example 2
    expect = (pixel - np.array([0.4377, 0.4438, 0.4728])) / np.array([0.1980, 0.2010, 0.1970])
    assert np.allclose(ds.train_x[2, :, 4, 27].numpy(), expect, atol=1e-5)


@pytest.mark.parametrize("name", ["fashionmnist", "emnist", "cifar100", "svhn"])
def test_missing_or_garbage_files_name_the_folder(tmp_path, name):
    loader = getattr(data, f"load_{name}")
    with pytest.raises(ConfigError, match=f"data.dataset={name}: no usable files under {tmp_path.resolve()}"):
        loader(str(tmp_path), download=False)
    # and load(cfg) dispatches the name to that loader with data.root and data.download
    cfg = SimpleNamespace(data=SimpleNamespace(dataset=name, root=str(tmp_path), download=False))
    with pytest.raises(ConfigError, match=f"data.dataset={name}: no usable files under {tmp_path.resolve()}"):
        data.load(cfg)
    # garbage where torchvision looks (no MD5 is checked for the IDX files)
    if name in ("fashionmnist", "emnist"):
        raw = tmp_path / ("FashionMNIST" if name == "fashionmnist" else "EMNIST") / "raw"
        raw.mkdir(parents=True)
        stem = "" if name == "fashionmnist" else "emnist-balanced-"
        for split in (("train", "t10k") if name == "fashionmnist" else ("train", "test")):
            for kind in ("images-idx3", "labels-idx1"):
                (raw / f"{stem}{split}-{kind}-ubyte").write_bytes(b"not an idx file")
        with pytest.raises(ConfigError, match=str(tmp_path.resolve())) as err:
            loader(str(tmp_path), download=False)
        assert "\n" not in str(err.value)


@pytest.mark.slow          # a train.py subprocess: about 5 s, mostly importing torch
def test_training_runs_on_fashionmnist_files(tmp_path):
    _write_fashionmnist(tmp_path / "data", n_train=16, n_test=4)
    train(["data.dataset=fashionmnist", "data.download=false", f"data.root={tmp_path / 'data'}",
           "data.partition=iid", "workers.n=4", "workers.byzantine=0", "attack.name=none",
           "aggregator.name=mean", "resampling.name=none", "train.steps=2", "train.eval_every=2",
           "train.batch_size=2", f"log.dir={tmp_path / 'runs'}", "log.wandb=off", "log.progress=false"],
          timeout=120)
    assert [p.name for p in (tmp_path / "runs").glob("*/summary.json")] == ["summary.json"]
