"""Splits resident on the device as float tensors in [0, 1], and per-batch binarization.

An epoch is a random permutation sliced into batches: no per-sample Python.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from vaekit.data.splits import RawSplits


class DeviceData:
    """The three splits as float tensors in [0, 1] on the device, plus batch iteration.

    With `binarize=True` (a Bernoulli likelihood) training batches are freshly binarized
    every time they are drawn, x ~ Bernoulli(intensity), while validation and test are
    binarized once with the dataset's `binarize_seed`, so their NELBO is comparable across
    epochs and runs.
    """

    def __init__(self, raw: RawSplits, device: torch.device, binarize: bool) -> None:
        scale = 1.0 / (raw.num_levels - 1)
        self.device = device
        self.binarize = binarize
        self.shape = raw.shape
        self.train = raw.train.to(device).float().mul_(scale)  # (N, C, H, W)
        self.val = raw.val.to(device).float().mul_(scale)
        self.test = raw.test.to(device).float().mul_(scale)
        self.test_labels = raw.test_labels.to(device)
        if binarize:
            generator = torch.Generator(device=device).manual_seed(raw.binarize_seed)
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

    def num_train_batches(self, batch_size: int) -> int:
        """Batches per epoch."""
        return -(-self.train.shape[0] // batch_size)


def batches(x: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Consecutive slices of a split (for evaluation, no shuffling)."""
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size]
