"""`RawSplits`: what every dataset loader returns, checked when it is made.

uint8 images (N, C, H, W) with values 0..num_levels-1 and int64 labels (N,) for the train,
validation and test splits. The checks run at load, before anything trains, so a file with a
wrong header or a label file of another length fails in one sentence naming the split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from vaekit.errors import VaekitError

SPLIT_NAMES = ("train", "val", "test")
# Seed of the one-off binarization of the validation and test splits (Bernoulli likelihoods):
# every run of a dataset is scored on the same binarized test set.
BINARIZE_SEED = 1234


@dataclass(frozen=True)
class RawSplits:
    """uint8 images (N, C, H, W) with values 0..num_levels-1, and int64 labels (N,) per split.

    `binarize_seed` seeds the one-off binarization of val and test when the likelihood is
    Bernoulli. Construction checks dtypes, shapes, counts and the value range.
    """

    train: Tensor
    val: Tensor
    test: Tensor
    train_labels: Tensor
    val_labels: Tensor
    test_labels: Tensor
    num_levels: int
    name: str
    binarize_seed: int = BINARIZE_SEED

    def __post_init__(self) -> None:
        check_splits(self)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. (1, 28, 28)."""
        return tuple(self.train.shape[1:])

    def images(self, split: str) -> Tensor:
        """The uint8 images of one split ('train', 'val' or 'test')."""
        return getattr(self, split)

    def labels(self, split: str) -> Tensor:
        """The labels (N,) of one split."""
        return getattr(self, f"{split}_labels")


def check_splits(raw: RawSplits) -> None:
    """Refuse, in one sentence, splits that are not uint8 (N, C, H, W) images of one shape
    with one label each and values below num_levels."""
    if not 2 <= raw.num_levels <= 256:
        raise VaekitError(f"{raw.name}: num_levels must be between 2 and 256, not {raw.num_levels}.")
    shape = None
    for split in SPLIT_NAMES:
        images, labels = raw.images(split), raw.labels(split)
        what = f"{raw.name}'s {split} split"
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise VaekitError(
                f"{what} must hold uint8 images (N, C, H, W), "
                f"not {images.dtype} of shape {tuple(images.shape)}."
            )
        if images.shape[0] == 0:
            raise VaekitError(f"{what} holds no images.")
        if shape is not None and tuple(images.shape[1:]) != shape:
            raise VaekitError(
                f"{what} holds images of shape {tuple(images.shape[1:])}, but the train split's are {shape}."
            )
        shape = tuple(images.shape[1:])
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise VaekitError(f"{what} has {images.shape[0]} images but {labels.shape[0]} labels.")
        top = int(images.max())
        if top >= raw.num_levels:
            raise VaekitError(
                f"{what} holds the value {top}, but the dataset has {raw.num_levels} levels "
                f"(0..{raw.num_levels - 1})."
            )


def split_off_validation(
    images: Tensor, labels: Tensor, val_size: int, seed: int, holder: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, train labels, val images, val labels): `val_size` examples drawn by a
    fixed-seed permutation, for sources with no validation split of their own. `holder` names
    what held the examples in the error, e.g. "the training file holds"."""
    if not 0 < val_size < len(images):
        raise VaekitError(
            f"dataset.val_size must be between 1 and {len(images) - 1} "
            f"({holder} {len(images)} images), not {val_size}."
        )
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    train, val = perm[:-val_size], perm[-val_size:]
    return images[train], labels[train], images[val], labels[val]


def check_declared(raw: RawSplits, shape: Sequence[int] | None, num_levels: int | None) -> RawSplits:
    """The config's `dataset.shape` and `dataset.num_levels` (which other groups interpolate)
    must be what the files hold; returns `raw` when they are."""
    if shape is not None and tuple(shape) != raw.shape:
        raise VaekitError(
            f"dataset.shape is {list(shape)} but the {raw.name} files hold images of shape {list(raw.shape)}."
        )
    if num_levels is not None and num_levels != raw.num_levels:
        raise VaekitError(
            f"dataset.num_levels is {num_levels} but {raw.name} has {raw.num_levels} intensity levels."
        )
    return raw


def first_examples(raw: RawSplits, limit_train: int | None, limit_eval: int | None) -> RawSplits:
    """`raw` cut to its first `limit_train` training examples and first `limit_eval` examples
    of val and of test (None: the whole split; a limit above a split's size keeps it whole).
    The first examples, not a random draw: the same subset on every run and every device."""
    if limit_train is None and limit_eval is None:
        return raw
    limits = {"train": limit_train, "val": limit_eval, "test": limit_eval}
    parts = {}
    for split, limit in limits.items():
        parts[split] = raw.images(split)[:limit]  # a view: no copy of the kept examples
        parts[f"{split}_labels"] = raw.labels(split)[:limit]
    return replace(raw, **parts)
