"""Splits resident on the device as float tensors in [0, 1], and per-batch binarization.

An epoch is a random permutation sliced into batches: no per-sample Python. Every random
draw about the data (the permutations, the binarization noise, the one-off binarization of
val and test) comes from a CPU generator and is then copied to the device, so one seed gives
the same data stream, and the same binarized test set, on every device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from vaekit.data.splits import SPLIT_NAMES, RawSplits
from vaekit.shards import Shard


class DeviceData:
    """The three splits as float tensors in [0, 1] on the device, plus batch iteration.

    With `binarize=True` (a Bernoulli likelihood) training batches are freshly binarized
    every time they are drawn, x ~ Bernoulli(intensity), while validation and test are
    binarized once on the CPU with the dataset's `binarize_seed`, so their NELBO is comparable
    across epochs, runs and devices. `checksums` holds a digest of each split as it is used
    (train as stored; val and test as scored, binarized where they are).
    """

    def __init__(self, raw: RawSplits, device: torch.device, binarize: bool) -> None:
        scale = 1.0 / (raw.num_levels - 1)
        self.device = device
        self.binarize = binarize
        self.shape = raw.shape
        val, test = raw.val.float().mul_(scale), raw.test.float().mul_(scale)  # on the CPU
        if binarize:
            generator = torch.Generator().manual_seed(raw.binarize_seed)
            val = torch.bernoulli(val, generator=generator)
            test = torch.bernoulli(test, generator=generator)
        self.train = self._place_train(raw, scale)  # (N, C, H, W)
        self.val = val.to(device)
        self.test = test.to(device)
        self.train_labels = raw.train_labels.to(device)  # (N,) int64, for conditional models
        self.val_labels = raw.val_labels.to(device)
        self.test_labels = raw.test_labels.to(device)
        scored = {"val": val, "test": test} if binarize else {"val": raw.val, "test": raw.test}
        self.checksums = {"train": split_checksum(raw.train)}
        self.checksums.update({name: split_checksum(split) for name, split in scored.items()})

    def _place_train(self, raw: RawSplits, scale: float) -> Tensor | None:
        """The training split as floats in [0, 1] on the device."""
        return raw.train.to(self.device).float().mul_(scale)

    @property
    def num_train(self) -> int:
        """Examples in the training split."""
        return self.train.shape[0]

    @property
    def num_dims(self) -> int:
        """Number of data dimensions D of one example (for bits/dim)."""
        return int(np.prod(self.shape))

    def permutation(self, generator: torch.Generator) -> Tensor:
        """A fresh random order of the training split for one epoch, (N,) int64 on the device,
        drawn from the CPU `generator`."""
        return torch.randperm(self.num_train, generator=generator).to(self.device)

    def train_batch(
        self, perm: Tensor, step: int, batch_size: int, generator: torch.Generator, shard: Shard | None = None
    ) -> Tensor:
        """Batch number `step` of the epoch ordered by `perm`, binarized afresh if asked:
        x = 1[u < intensity] with u ~ U[0, 1) from the CPU `generator`. With `shard` (one of
        several processes sharing the batch), only its rows, binarized with their part of the
        whole batch's noise, so the generator advances alike in every process."""
        index = perm[step * batch_size : (step + 1) * batch_size]
        rows = shard.rows(index.shape[0]) if shard is not None else None
        x = self.train[index if rows is None else index[rows]]
        return self.binarized(x, generator, index.shape[0], rows) if self.binarize else x

    def train_labels_batch(
        self, perm: Tensor, step: int, batch_size: int, shard: Shard | None = None
    ) -> Tensor:
        """The labels (B,) int64 on the device of exactly the rows `train_batch(perm, step,
        batch_size, ..., shard)` returns, in their order (a conditional model's y)."""
        index = perm[step * batch_size : (step + 1) * batch_size]
        rows = shard.rows(index.shape[0]) if shard is not None else None
        index = index if rows is None else index[rows]
        return self.train_labels[index.to(self.train_labels.device)]

    def binarized(
        self, x: Tensor, generator: torch.Generator, total: int | None = None, rows: slice | None = None
    ) -> Tensor:
        """x' = 1[u < x] with u ~ U[0, 1) drawn from the CPU `generator`, x (B, C, H, W) on the device.
        With `rows`, x holds those rows of a batch of `total`: u is drawn for all and sliced."""
        pinned = self.device.type == "cuda"  # a pinned buffer lets the copy run asynchronously
        shape = x.shape if rows is None else (total, *x.shape[1:])
        u = torch.rand(shape, generator=generator, pin_memory=pinned)
        u = u if rows is None else u[rows]
        return (u.to(self.device, non_blocking=True) < x).to(x.dtype)

    def num_train_batches(self, batch_size: int) -> int:
        """Batches per epoch."""
        return -(-self.num_train // batch_size)


def split_checksum(x: Tensor) -> str:
    """BLAKE2b (64-bit, hex) of a split as uint8 values with its shape: the same images, or the
    same binarization, give the same checksum on any device and in any run."""
    values = x if x.dtype == torch.uint8 else x.round().to(torch.uint8)  # binarized: 0 and 1
    digest = hashlib.blake2b(str(tuple(values.shape)).encode(), digest_size=8)
    digest.update(values.contiguous().view(-1).numpy())
    return digest.hexdigest()


def changed_splits(saved: dict[str, str] | None, now: dict[str, str]) -> list[str]:
    """Names of the splits whose checksum differs from `saved` (none when nothing was saved)."""
    if not isinstance(saved, dict):
        return []
    return [name for name in SPLIT_NAMES if name in saved and saved[name] != now.get(name)]


def batches(x: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Consecutive slices of a split (for evaluation, no shuffling)."""
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size]
