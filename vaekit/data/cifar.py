"""CIFAR-10 from its python-pickle batches, read directly with a restricted unpickler.

    <root>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch

(cifar-10-python.tar.gz unpacked; `<root>` may also hold the batches itself). Each batch is
a pickled dict with `data`, uint8 (N, 3072) rows of 1024 red, 1024 green, 1024 blue values
of a 32x32 image, and `labels`, N ints 0..9. A pickle can run code when it is loaded, so
the batches go through an unpickler that builds numpy arrays and plain containers only:
any other global a file names (`os.system`, ...) is refused before it is called.
"""

from __future__ import annotations

import codecs
import functools
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaekit.data.splits import BINARIZE_SEED, RawSplits, check_declared, split_off_validation
from vaekit.errors import VaekitError

CIFAR_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
CIFAR_SHAPE = (3, 32, 32)
CIFAR_CLASSES = 10


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """What protocol 0-2 pickles of bytes call (`_codecs.encode(str, 'latin1')`), for that
    encoding only."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with the encoding {encoding!r}")
    return codecs.encode(text, "latin-1")


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled dict of numpy arrays needs, by (module, name), whichever numpy
    (1.x: numpy.core, 2.x: numpy._core) wrote or reads the file."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global that a CIFAR batch never needs."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.target = f"{module}.{name}"


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only numpy's array-rebuilding globals (see _allowed_globals);
    every other global, builtins included, raises RefusedGlobal instead of being imported."""

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_globals().get((module, name))
        if found is None:
            raise RefusedGlobal(module, name)
        return found


def _missing_message(path: Path) -> str:
    return (
        f"{path.resolve()} is missing: CIFAR-10 needs {', '.join(TRAIN_BATCHES)} and {TEST_BATCH} "
        f"(cifar-10-python.tar.gz, unpacked) in {path.parent.resolve()}."
    )


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch: images (N, 3, 32, 32) uint8 and labels (N,) int64; one sentence
    naming the file when it is missing, is not such a batch, or asks for code."""
    if not path.is_file():
        raise VaekitError(_missing_message(path))
    try:
        with path.open("rb") as handle:
            batch = RestrictedUnpickler(handle, encoding="latin1").load()
    except RefusedGlobal as error:
        raise VaekitError(
            f"{path.resolve()} asks to load {error.target}, which a CIFAR-10 batch never holds, "
            f"so it is refused (loading it could run code)."
        ) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise VaekitError(
            f"{path.resolve()} is not a readable CIFAR-10 batch ({reason.rstrip('.')})."
        ) from error
    except OSError as error:
        raise VaekitError(f"Could not read {path.resolve()}: {error.strerror or error}.") from error
    return _check_batch(batch, path)


def _field(batch: dict[Any, Any], key: str) -> Any:
    for candidate in (key, key.encode()):
        if candidate in batch:
            return batch[candidate]
    return None


def _check_batch(batch: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
    where = path.resolve()
    if not isinstance(batch, dict):
        raise VaekitError(f"{where} holds a {type(batch).__name__}, not the dict of a CIFAR-10 batch.")
    data, labels = _field(batch, "data"), _field(batch, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise VaekitError(f"{where} must hold 'data' as a uint8 array (N, 3072), not {what}.")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        labels = np.zeros(0, dtype=np.int64) - 1
    if labels.shape != (len(data),) or (
        len(labels) and not 0 <= labels.min() <= labels.max() < CIFAR_CLASSES
    ):
        raise VaekitError(f"{where} must hold 'labels' as {len(data)} integers 0..{CIFAR_CLASSES - 1}.")
    images = data.reshape(-1, *CIFAR_SHAPE)
    return (images if images.flags.writeable else images.copy()), labels


def _batch_folder(root: Path, download: bool) -> Path:
    folder = root / CIFAR_FOLDER
    if not folder.is_dir() and (root / TRAIN_BATCHES[0]).is_file():
        return root  # the batches directly under root
    if download and not folder.is_dir():
        import torchvision.datasets  # imported here: only a download needs it

        try:
            torchvision.datasets.CIFAR10(root=str(root), train=True, download=True)
        except (RuntimeError, OSError) as error:  # network errors (URLError is an OSError)
            raise VaekitError(
                f"Could not download CIFAR-10 (no network?): unpack cifar-10-python.tar.gz into "
                f"{root.resolve()} and run with dataset.download=false."
            ) from error
    if not folder.is_dir():
        raise VaekitError(
            f"CIFAR-10 not found: unpack cifar-10-python.tar.gz so that {folder.resolve()} holds "
            f"{', '.join(TRAIN_BATCHES)} and {TEST_BATCH}, set dataset.root to the folder that holds "
            f"{CIFAR_FOLDER}, or pass dataset.download=true on a machine with network access."
        )
    return folder


def load_cifar10(
    root: str = "data",
    val_size: int = 5000,
    split_seed: int = 14,
    download: bool = False,
    name: str = "cifar10",
    shape: Sequence[int] | None = None,
    num_levels: int | None = None,
    binarize_seed: int = BINARIZE_SEED,
) -> RawSplits:
    """CIFAR-10 as uint8 (N, 3, 32, 32), 256 levels, labels 0..9.

    The five training batches (50,000 images) are split into train and val (`val_size`) by
    a permutation with `split_seed`; test_batch (10,000) is the test split. `download`
    fetches the archive through torchvision first (network needed). `shape` and
    `num_levels`, when given, must match the files: (3, 32, 32) and 256.
    """
    folder = _batch_folder(Path(root).expanduser(), download)
    missing = [batch for batch in (*TRAIN_BATCHES, TEST_BATCH) if not (folder / batch).is_file()]
    if missing:  # before reading any: a missing file costs no time
        raise VaekitError(_missing_message(folder / missing[0]))
    train = [read_batch(folder / batch_name) for batch_name in TRAIN_BATCHES]
    train_x = torch.from_numpy(np.concatenate([x for x, _ in train]))
    train_y = torch.from_numpy(np.concatenate([y for _, y in train]))
    test_x, test_y = (torch.from_numpy(a) for a in read_batch(folder / TEST_BATCH))
    train_x, train_y, val_x, val_y = split_off_validation(
        train_x, train_y, val_size, split_seed, "the training batches hold"
    )
    raw = RawSplits(
        train=train_x.contiguous(),
        val=val_x.contiguous(),
        test=test_x.contiguous(),
        train_labels=train_y,
        val_labels=val_y,
        test_labels=test_y,
        num_levels=256,
        name=name,
        binarize_seed=binarize_seed,
    )
    return check_declared(raw, shape, num_levels)
