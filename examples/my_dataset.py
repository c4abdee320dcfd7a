"""A plug-in dataset: `data.dataset=examples.my_dataset:blobs`.

byzddp calls the loader with `root` (data.root) and the keywords of `data.args`; it returns
(train, test), each a pair of tensors (x, y) or a torch Dataset of (x, y) items. byzddp holds both
in memory, partitions the training set among the workers (data.partition) and draws the batches.
The number of classes is data.classes, else the train set's `classes` attribute, else the
largest label + 1.

    python train.py data.dataset=examples.my_dataset:blobs data.args.classes=4
"""
import torch
from torch.utils.data import TensorDataset


def blobs(root, classes=4, dim=16, per_class=100, spread=0.5, seed=0):
    """Gaussian clusters around random centres: `per_class` training and `per_class // 4` test
    examples per class. The training set comes as tensors, the test set as a Dataset (either works)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 2

    def draw(count):
        y = torch.arange(classes).repeat_interleave(count)
        return centres[y] + spread * torch.randn(len(y), dim, generator=g), y

    train = draw(per_class)
    test = TensorDataset(*draw(max(1, per_class // 4)))
    return train, test
