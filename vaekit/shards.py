"""A batch shared by several processes (data-parallel training): which rows each one takes, and
Gaussian noise that does not depend on how the batch is split.

Process `rank` of `world` takes a contiguous block of every batch (`shard_rows`). Inside
`split_noise(total, rows)` the Gaussian draws of a model (`standard_normal`, used by the
diagonal Gaussians of `vaekit.posteriors` and the levels of `vaekit.hierarchical`) are drawn for
all `total` rows from the shared stream, and each process keeps its own rows: every process
advances the stream alike, and an example gets the noise one process would have given it.
Outside the context, `standard_normal` is torch's own draw, unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

# (total rows, this process's rows) while a split batch is evaluated; None otherwise
_SPLIT: ContextVar[tuple[int, slice] | None] = ContextVar("vaekit_split_noise", default=None)


def shard_rows(count: int, rank: int, world: int) -> slice:
    """Rows [start, stop) of a batch of `count` examples that process `rank` of `world` takes:
    contiguous blocks whose sizes differ by at most one (the first `count % world` are larger)."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


@dataclass(frozen=True)
class Shard:
    """Process `rank` of `world`; `reduce` sums a tensor over all processes (in place, returned),
    so sums over each process's examples become sums over all of them."""

    rank: int
    world: int
    reduce: Callable[[Tensor], Tensor]

    def rows(self, count: int) -> slice:
        """This process's rows of a batch of `count` examples (`shard_rows`)."""
        return shard_rows(count, self.rank, self.world)

    def seed(self, seed: int) -> int:
        """A seed for this process's own draws (`seed` itself on rank 0), well mixed."""
        if self.rank == 0:
            return seed
        digest = hashlib.blake2b(repr((seed, self.rank)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def split_noise(total: int, rows: slice | None) -> Iterator[None]:
    """Within it, Gaussian draws for a batch of `total` rows keep only `rows` (None: no split)."""
    if rows is None:
        yield
        return
    token = _SPLIT.set((total, rows))
    try:
        yield
    finally:
        _SPLIT.reset(token)


def standard_normal(shape: torch.Size, batch_dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """N(0, 1) noise of `shape`, whose dimension `batch_dim` runs over the examples of the batch.

    In one process this is torch's draw (`torch.distributions.Normal.rsample`'s). Inside
    `split_noise(total, rows)` it draws the noise of all `total` rows and returns `rows` of it.
    """
    split = _SPLIT.get()
    if split is None:
        return torch.empty(shape, dtype=dtype, device=device).normal_()
    total, rows = split
    if shape[batch_dim] != rows.stop - rows.start:  # a draw over something other than the batch
        raise RuntimeError(
            f"a draw of shape {tuple(shape)} inside split_noise: dimension {batch_dim} should hold "
            f"this process's {rows.stop - rows.start} rows of the batch"
        )
    full = list(shape)
    full[batch_dim] = total
    noise = torch.empty(full, dtype=dtype, device=device).normal_()
    return noise.narrow(batch_dim, rows.start, rows.stop - rows.start)
