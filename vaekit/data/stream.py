"""The streaming path: the training split stays in host memory as uint8 (a memory-mapped array
where the loader made one), and each batch is gathered by a `torch.utils.data.DataLoader`
(workers, pinned memory, a non-blocking copy), then scaled and binarized on the device.

It draws the same permutations and binarization noise, from the same CPU generator and in the
same order, as the in-memory path, so one seed gives the same batches, bit for bit, on both.
Validation and test stay resident on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from vaekit.data.memory import DeviceData
from vaekit.data.splits import RawSplits
from vaekit.shards import Shard

log = logging.getLogger("vaekit")


class _Rows(Dataset):
    """uint8 rows of the training split by index tensor: one __getitem__ per batch."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: Tensor) -> Tensor:
        return self.images[index]


class _EpochSlices(Sampler):
    """Consecutive batch-size slices of an epoch's permutation, from batch `start` on."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.perm = torch.empty(0, dtype=torch.long)
        self.start = 0
        self.shard: Shard | None = None  # with several processes: only this one's rows of each batch

    def __iter__(self) -> Iterator[Tensor]:
        for begin in range(self.start * self.batch_size, self.perm.shape[0], self.batch_size):
            index = self.perm[begin : begin + self.batch_size]
            yield index if self.shard is None else index[self.shard.rows(index.shape[0])]

    def __len__(self) -> int:
        return max(0, -(-self.perm.shape[0] // self.batch_size) - self.start)


class ScaledRows:
    """The training split as `DeviceData.train` offers it, for the few readers that pick rows
    (the VampPrior's initialization): x[index] -> floats in [0, 1] on the device."""

    def __init__(self, images: Tensor, scale: float, device: torch.device) -> None:
        self.images, self.scale, self.device = images, scale, device
        self.shape = images.shape

    def __getitem__(self, index: Tensor) -> Tensor:
        return self.images[index.cpu()].to(self.device).float().mul_(self.scale)


class StreamedData(DeviceData):
    """`DeviceData` whose training split is streamed from host memory (see the module doc).

    `num_workers` DataLoader workers gather the uint8 rows of each batch (0: the main process
    does); on a GPU the rows travel through pinned memory with a non-blocking copy. The labels
    (small) stay resident on the device: `train_labels_batch` is DeviceData's, the same rows of
    the same permutation (and shard) that the loader gathers.
    """

    def __init__(self, raw: RawSplits, device: torch.device, binarize: bool, num_workers: int) -> None:
        self.rows = _Rows(raw.train)
        super().__init__(raw, device, binarize)
        self.scale = 1.0 / (raw.num_levels - 1)
        self.train = ScaledRows(raw.train, self.scale, device)
        self.slices: _EpochSlices | None = None
        self.num_workers = num_workers
        self.batches: Iterator[Tensor] | None = None
        self.next_step: tuple[Tensor, int] | None = None  # (perm, step) the iterator yields next

    @property
    def num_train(self) -> int:
        return self.rows.images.shape[0]

    def _place_train(self, raw: RawSplits, scale: float) -> Tensor | None:
        return None  # the training split stays on the host

    def permutation(self, generator: torch.Generator) -> Tensor:
        """A fresh random order of the training split, (N,) int64 on the CPU (as drawn)."""
        return torch.randperm(self.num_train, generator=generator)

    def train_batch(
        self, perm: Tensor, step: int, batch_size: int, generator: torch.Generator, shard: Shard | None = None
    ) -> Tensor:
        """Batch number `step` of the epoch ordered by `perm`: the loader's next batch when the
        trainer asks for them in order (a fresh loader pass otherwise: a new epoch, a resume).
        With `shard`, only its rows, gathered and binarized as `DeviceData.train_batch` does."""
        if self.next_step is None or self.next_step[0] is not perm or self.next_step[1] != step:
            self.batches = self._start(perm.cpu(), step, batch_size, shard)
        rows = next(self.batches).to(self.device, non_blocking=True)
        self.next_step = (perm, step + 1)
        x = rows.float().mul_(self.scale)
        if not self.binarize:
            return x
        total = min(batch_size, self.num_train - step * batch_size)
        return self.binarized(x, generator, total, shard.rows(total) if shard is not None else None)

    def _start(self, perm: Tensor, step: int, batch_size: int, shard: Shard | None) -> Iterator[Tensor]:
        if self.slices is None or self.slices.batch_size != batch_size:
            self.slices = _EpochSlices(batch_size)
            self.loader = DataLoader(
                self.rows,
                sampler=self.slices,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.num_workers > 0,
                # each pass draws its workers' base seed: from a generator of its own, not from
                # the global stream that the model's noise comes from
                generator=torch.Generator(),
            )
        self.slices.perm, self.slices.start, self.slices.shard = perm, step, shard
        return iter(self.loader)

