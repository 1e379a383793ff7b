"""The MNIST family in IDX files (MNIST, FashionMNIST, KMNIST) through torchvision's loaders."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from pathlib import Path

from vaekit.data.splits import BINARIZE_SEED, RawSplits, check_declared, split_off_validation
from vaekit.errors import VaekitError

IDX_DATASETS = ("MNIST", "FashionMNIST", "KMNIST")


def _missing_files_message(dataset_class: str, root: Path, download: bool) -> str:
    folder = root / dataset_class / "raw"
    files = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
    if download:
        return (
            f"Could not download {dataset_class} (no network?): put {files} "
            f"into {folder.resolve()} and run with dataset.download=false."
        )
    return (
        f"{dataset_class} not found: put {files} into {folder.resolve()}, "
        f"set dataset.root to the folder that holds {dataset_class}/raw, "
        f"or pass dataset.download=true on a machine with network access."
    )


IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IDX_DTYPE_UBYTE = 0x08  # the type byte of unsigned-byte IDX data


def check_idx_files(folder: Path) -> None:
    """Refuse, naming the file, an IDX file that is only gzipped, has a wrong header, or holds
    fewer or more bytes than its header promises. Missing files are left to the caller."""
    for name in IDX_FILES:
        path = folder / name
        if not path.exists():
            if (folder / f"{name}.gz").exists():
                raise VaekitError(
                    f"{folder / name}.gz is compressed: vaekit reads the uncompressed IDX files, "
                    f"so run `gunzip {folder / name}.gz` first."
                )
            continue
        header = path.read_bytes()[:4]
        if (
            len(header) < 4
            or header[:2] != b"\0\0"
            or header[2] != IDX_DTYPE_UBYTE
            or not 1 <= header[3] <= 4
        ):
            raise VaekitError(
                f"{path} is not an IDX file of unsigned bytes (its first bytes are {header!r})."
            )
        ndim = header[3]
        with path.open("rb") as handle:
            handle.seek(4)
            dims = struct.unpack(f">{ndim}I", handle.read(4 * ndim).ljust(4 * ndim, b"\0"))
        expected = 4 + 4 * ndim + math.prod(dims)
        found = path.stat().st_size
        if found != expected:
            raise VaekitError(
                f"{path} is truncated or damaged: its header promises {expected} bytes "
                f"({' x '.join(map(str, dims))} values), but the file holds {found}."
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
    shape: Sequence[int] | None = None,
    num_levels: int | None = None,
    binarize_seed: int = BINARIZE_SEED,
) -> RawSplits:
    """MNIST-like 28x28 datasets through torchvision's loaders (no download unless asked).

    The official training set is split into train and val (`val_size` images) by a
    permutation with a fixed seed; the official test set is the test split. `shape` and
    `num_levels`, when given, must match the files: (1, 28, 28) and 256.
    """
    if dataset_class not in IDX_DATASETS:
        raise VaekitError(f"dataset_class must be one of {', '.join(IDX_DATASETS)}, not {dataset_class}.")
    root_path = Path(root).expanduser()
    check_idx_files(root_path / dataset_class / "raw")
    train_x, train_y = _torchvision_split(dataset_class, root_path, True, download)
    test_x, test_y = _torchvision_split(dataset_class, root_path, False, download)
    train_x, train_y, val_x, val_y = split_off_validation(
        train_x, train_y, val_size, split_seed, "the training file holds"
    )
    raw = RawSplits(
        train=train_x.unsqueeze(1),
        val=val_x.unsqueeze(1),
        test=test_x.unsqueeze(1),
        train_labels=train_y,
        val_labels=val_y,
        test_labels=test_y,
        num_levels=256,
        name=name or dataset_class.lower(),
        binarize_seed=binarize_seed,
    )
    return check_declared(raw, shape, num_levels)
