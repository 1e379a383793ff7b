"""Datasets as whole tensors on the device, their splits, and per-batch binarization.

Every loader returns `RawSplits`: uint8 images of shape (N, C, H, W) with values
0..num_levels-1 and integer labels. `DeviceData` turns them into float tensors in [0, 1]
resident on the device; the likelihood decides whether batches are binarized.
An epoch is a random permutation sliced into batches: no per-sample Python.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vaekit.errors import VaekitError

DIGITS_SPLIT = (1000, 350)  # train, val; test = the remaining 447 (the book's split)


@dataclass(frozen=True)
class RawSplits:
    """uint8 images (N, C, H, W) with values 0..num_levels-1, and int64 labels (N,)."""

    train: Tensor
    val: Tensor
    test: Tensor
    train_labels: Tensor
    val_labels: Tensor
    test_labels: Tensor
    num_levels: int
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. (1, 28, 28)."""
        return tuple(self.train.shape[1:])


def _digits_array() -> np.ndarray:
    """scikit-learn's digits as a (1797, 65) array (64 pixels, then the label).

    Read straight from the CSV that ships inside scikit-learn: importing
    `sklearn.datasets` costs over a second of start-up for one small file.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise VaekitError("dataset=digits needs scikit-learn: pip install scikit-learn.")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.exists():  # an unusual layout: fall back to the public loader
        from sklearn.datasets import load_digits as sk_load_digits

        bunch = sk_load_digits()
        return np.concatenate([bunch.data, bunch.target[:, None]], axis=1)
    with gzip.open(path, "rt") as handle:
        return np.loadtxt(handle, delimiter=",")


def load_digits(name: str = "digits", **_: object) -> RawSplits:
    """scikit-learn's 8x8 digits, values 0..16; train/val/test = 1000/350/447 in file order."""
    array = _digits_array()
    images = torch.from_numpy(array[:, :64]).to(torch.uint8).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(array[:, 64]).long()
    n_train, n_val = DIGITS_SPLIT
    cut = (slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None))
    return RawSplits(*(images[s] for s in cut), *(labels[s] for s in cut), num_levels=17, name=name)


def _missing_files_message(dataset_class: str, root: Path, download: bool) -> str:
    folder = root / dataset_class / "raw"
    files = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
    if download:
        return (
            f"Could not download {dataset_class} (no network?): put {files} "
            f"(optionally .gz) into {folder.resolve()} and run with dataset.download=false."
        )
    return (
        f"{dataset_class} not found: put {files} (optionally .gz) into {folder.resolve()}, "
        f"set dataset.root to the folder that holds {dataset_class}/raw, "
        f"or pass dataset.download=true on a machine with network access."
    )


def _torchvision_split(dataset_class: str, root: Path, train: bool, download: bool):
    import torchvision.datasets  # imported here: it costs start-up time digits never needs

    cls = getattr(torchvision.datasets, dataset_class)
    try:
        dataset = cls(root=str(root), train=train, download=download)
    except RuntimeError as error:
        raise VaekitError(_missing_files_message(dataset_class, root, download)) from error
    except OSError as error:  # network errors (URLError is an OSError) or unreadable files
        raise VaekitError(_missing_files_message(dataset_class, root, download)) from error
    except (ValueError, AssertionError) as error:
        raise VaekitError(
            f"The {dataset_class} files under {(root / dataset_class / 'raw').resolve()} "
            f"are not valid IDX files ({error})."
        ) from error
    return dataset.data, dataset.targets


def load_torchvision(
    dataset_class: str,
    root: str = "data",
    download: bool = False,
    val_size: int = 10000,
    split_seed: int = 14,
    name: str | None = None,
    **_: object,
) -> RawSplits:
    """MNIST-like 28x28 datasets through torchvision's loaders (no download unless asked).

    The official training set is split into train and val (`val_size` images) by a
    permutation with a fixed seed; the official test set is the test split.
    """
    if dataset_class not in ("MNIST", "FashionMNIST", "KMNIST"):
        raise VaekitError(f"dataset_class must be MNIST, FashionMNIST or KMNIST, not {dataset_class}.")
    root_path = Path(root).expanduser()
    train_x, train_y = _torchvision_split(dataset_class, root_path, True, download)
    test_x, test_y = _torchvision_split(dataset_class, root_path, False, download)
    if not 0 < val_size < len(train_x):
        raise VaekitError(
            f"dataset.val_size must be between 1 and {len(train_x) - 1} "
            f"(the training file holds {len(train_x)} images), not {val_size}."
        )
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(split_seed))
    train_idx, val_idx = perm[:-val_size], perm[-val_size:]
    return RawSplits(
        train=train_x[train_idx].unsqueeze(1),
        val=train_x[val_idx].unsqueeze(1),
        test=test_x.unsqueeze(1),
        train_labels=train_y[train_idx],
        val_labels=train_y[val_idx],
        test_labels=test_y,
        num_levels=256,
        name=name or dataset_class.lower(),
    )


class DeviceData:
    """The three splits as float tensors in [0, 1] on the device, plus batch iteration.

    With `binarize=True` (a Bernoulli likelihood) training batches are freshly binarized
    every time they are drawn, x ~ Bernoulli(intensity), while validation and test are
    binarized once with `binarize_seed`, so their NELBO is comparable across epochs and runs.
    """

    def __init__(
        self, raw: RawSplits, device: torch.device, binarize: bool, binarize_seed: int = 1234
    ) -> None:
        scale = 1.0 / (raw.num_levels - 1)
        self.device = device
        self.binarize = binarize
        self.shape = raw.shape
        self.train = raw.train.to(device).float().mul_(scale)  # (N, C, H, W)
        self.val = raw.val.to(device).float().mul_(scale)
        self.test = raw.test.to(device).float().mul_(scale)
        self.test_labels = raw.test_labels.to(device)
        if binarize:
            generator = torch.Generator(device=device).manual_seed(binarize_seed)
            self.val = torch.bernoulli(self.val, generator=generator)
            self.test = torch.bernoulli(self.test, generator=generator)

    @property
    def num_dims(self) -> int:
        """Number of data dimensions D of one example (for bits/dim)."""
        return int(np.prod(self.shape))

    def permutation(self, generator: torch.Generator) -> Tensor:
        """A fresh random order of the training split for one epoch, (N,) int64."""
        return torch.randperm(self.train.shape[0], device=self.device, generator=generator)

    def train_batch(self, perm: Tensor, step: int, batch_size: int, generator: torch.Generator) -> Tensor:
        """Batch number `step` of the epoch ordered by `perm`, binarized afresh if asked."""
        x = self.train[perm[step * batch_size : (step + 1) * batch_size]]
        return torch.bernoulli(x, generator=generator) if self.binarize else x

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        """One epoch: slices of a random permutation; the last batch may be smaller."""
        perm = self.permutation(generator)
        for step in range(self.num_train_batches(batch_size)):
            yield self.train_batch(perm, step, batch_size, generator)

    def num_train_batches(self, batch_size: int) -> int:
        """Batches per epoch."""
        return -(-self.train.shape[0] // batch_size)


def batches(x: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Consecutive slices of a split (for evaluation, no shuffling)."""
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size]
