"""scikit-learn's 8x8 digits (ships inside scikit-learn): the default, embedded dataset."""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vaekit.data.splits import BINARIZE_SEED, RawSplits, check_declared
from vaekit.errors import VaekitError

DIGITS_SPLIT = (1000, 350)  # train, val; test = the remaining 447 (the book's split)
DIGITS_LEVELS = 17  # pixel values 0..16


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


def load_digits(
    name: str = "digits",
    shape: Sequence[int] | None = None,
    num_levels: int | None = None,
    binarize_seed: int = BINARIZE_SEED,
) -> RawSplits:
    """scikit-learn's 8x8 digits, values 0..16; train/val/test = 1000/350/447 in file order.

    `shape` and `num_levels`, when given (the config declares them for interpolation), must
    match the data: (1, 8, 8) and 17.
    """
    array = _digits_array()
    images = torch.from_numpy(array[:, :64]).to(torch.uint8).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(array[:, 64]).long()
    n_train, n_val = DIGITS_SPLIT
    cut = (slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None))
    raw = RawSplits(
        *(images[s] for s in cut),
        *(labels[s] for s in cut),
        num_levels=DIGITS_LEVELS,
        name=name,
        binarize_seed=binarize_seed,
    )
    return check_declared(raw, shape, num_levels)
