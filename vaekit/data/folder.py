"""Folders of image files (PNG, JPEG, WebP, BMP at any depth): `image_folder` and `celeba64`.

Images are decoded once (vaekit/data/cache.py) and served from a cache afterwards.

Splits: when the top of the folder holds `train/` and `val/` and/or `test/`, those are the
splits (a missing val or test is carved from train with a fixed seed) and files outside them
are ignored; otherwise a permutation with a fixed seed assigns `val_fraction` and
`test_fraction` of the images to val and test. CelebA's `list_eval_partition.txt`, when
present, gives its official split instead.

Labels: the first folder level under the root (or under each split folder) names the class;
sorted names are labels 0..n-1. Without class folders every image has label 0; with them,
files lying directly at the top (no class folder) get label -1, "unlabelled".
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vaekit.data.cache import (
    SPLIT_CODES,
    Decoded,
    FileEntry,
    Preprocess,
    cached,
    decode_files,
    scan_images,
    split_codes,
)
from vaekit.data.splits import BINARIZE_SEED, SPLIT_NAMES, RawSplits, check_declared
from vaekit.errors import VaekitError

log = logging.getLogger("vaekit")

KINDS = "PNG, JPEG, WebP or BMP"
UNLABELLED = -1  # label of a file outside every class folder when the others have one
CELEBA_PARTITION = "list_eval_partition.txt"  # lines '<file> <0 train | 1 val | 2 test>'
CELEBA_IMAGES = "img_align_celeba"


def load_image_folder(
    root: str,
    image_size: int = 64,
    channels: int = 3,
    center_crop: int | None = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    split_seed: int = 14,
    cache_dir: str | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    name: str = "image_folder",
    shape: Sequence[int] | None = None,
    num_levels: int | None = None,
    binarize_seed: int = BINARIZE_SEED,
) -> RawSplits:
    """Every PNG/JPEG/WebP/BMP under `root` as uint8 (N, channels, image_size, image_size).

    Each image is center-cropped to `center_crop` pixels (if set), resized so its short side
    is `image_size` (antialiased bilinear), center-cropped to a square, and converted to
    grayscale (channels=1) or RGB (channels=3); 256 levels. Splits and labels follow the
    module docstring. Decoded arrays are cached under `cache_dir` (default
    `$XDG_CACHE_HOME/vaekit/image_folder`); `workers` decoding threads (None: one per CPU);
    `progress` shows the decoding bar (None: on a terminal). `shape` and `num_levels`, when
    given, must match: (channels, image_size, image_size) and 256.
    """
    folder = _existing_folder(root, "dataset.root")
    raw = _load_folder(
        folder,
        Preprocess(image_size, channels, center_crop),
        val_fraction,
        test_fraction,
        split_seed,
        cache_dir,
        workers,
        progress,
        name,
        binarize_seed,
    )
    return check_declared(raw, shape, num_levels)


def load_celeba64(
    root: str = "data",
    image_size: int = 64,
    center_crop: int | None = 148,
    channels: int = 3,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    split_seed: int = 14,
    cache_dir: str | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    name: str = "celeba64",
    shape: Sequence[int] | None = None,
    num_levels: int | None = None,
    binarize_seed: int = BINARIZE_SEED,
) -> RawSplits:
    """CelebA's aligned faces, center-cropped to 148 and resized to 64x64 RGB (the usual VAE set-up).

    The images are read from `<root>/celeba/img_align_celeba/` (torchvision's layout),
    `<root>/img_align_celeba/` or `<root>` itself. `list_eval_partition.txt` beside the images
    (or one folder up) gives the official split (162,770 / 19,867 / 19,962) and files it does
    not list are skipped; without it the fractions split with a fixed seed. Labels are 0.
    """
    base = Path(root).expanduser()
    candidates = [base / "celeba" / CELEBA_IMAGES, base / CELEBA_IMAGES, base]
    folder = next((path for path in candidates if path.is_dir()), None)
    if folder is None:
        raise VaekitError(
            f"CelebA not found: put {CELEBA_IMAGES}/ and {CELEBA_PARTITION} into "
            f"{(base / 'celeba').resolve()}, or set dataset.root to the folder that holds them."
        )
    partition_file = next(
        (path / CELEBA_PARTITION for path in (folder, folder.parent) if (path / CELEBA_PARTITION).is_file()),
        None,
    )
    raw = _load_folder(
        folder,
        Preprocess(image_size, channels, center_crop),
        val_fraction,
        test_fraction,
        split_seed,
        cache_dir,
        workers,
        progress,
        name,
        binarize_seed,
        partition_file=partition_file,
    )
    return check_declared(raw, shape, num_levels)


def _existing_folder(root: str | os.PathLike[str] | None, option: str) -> Path:
    """`root` as a Path to an existing folder, else one sentence naming it."""
    if root is None or str(root) == "":
        raise VaekitError(f"{option} is not set: set it to a folder of {KINDS} images.")
    folder = Path(root).expanduser()
    if not folder.exists():
        raise VaekitError(
            f"The image folder {folder.resolve()} does not exist: set {option} to a folder of {KINDS} images."
        )
    if not folder.is_dir():
        raise VaekitError(f"{folder.resolve()} is a file, but {option} must be a folder of {KINDS} images.")
    return folder


def _check_options(preprocess: Preprocess, val_fraction: float, test_fraction: float) -> None:
    if preprocess.channels not in (1, 3):
        raise VaekitError(f"dataset.channels must be 1 (grayscale) or 3 (RGB), not {preprocess.channels}.")
    if preprocess.image_size < 1:
        raise VaekitError(f"dataset.image_size must be at least 1, not {preprocess.image_size}.")
    if preprocess.center_crop is not None and preprocess.center_crop < 1:
        raise VaekitError(f"dataset.center_crop must be at least 1 (or null), not {preprocess.center_crop}.")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise VaekitError(
            f"dataset.val_fraction and dataset.test_fraction must be above 0 with a sum below 1, "
            f"not {val_fraction} and {test_fraction}."
        )


def _read_partition(path: Path) -> dict[str, int]:
    """CelebA's list_eval_partition.txt as {file name: split code}."""
    partition: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise VaekitError(f"Could not read {path}: {error}.") from error
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise VaekitError(
                f"{path} line {number} reads {line.strip()!r}, not '<file name> <0 train, 1 val or 2 test>'."
            )
        partition[fields[0]] = int(fields[1])
    return partition


def _layout(entries: Sequence[FileEntry]) -> tuple[list[FileEntry], list[int | None], list[str | None]]:
    """The files used, their split code from a split folder (None: to be assigned) and
    their class folder (None: directly at the top)."""
    tops = {entry.relpath.split("/")[0] for entry in entries if "/" in entry.relpath}
    by_folder = "train" in tops and ("val" in tops or "test" in tops)
    used: list[FileEntry] = []
    codes: list[int | None] = []
    classes: list[str | None] = []
    ignored = 0
    for entry in entries:
        parts = entry.relpath.split("/")
        code = None
        if by_folder:
            if len(parts) < 2 or parts[0] not in SPLIT_CODES:
                ignored += 1
                continue
            code, parts = SPLIT_CODES[parts[0]], parts[1:]
        used.append(entry)
        codes.append(code)
        classes.append(parts[0] if len(parts) >= 2 else None)
    if ignored:
        log.warning("ignored %d image files outside the train/, val/ and test/ folders", ignored)
    return used, codes, classes


def _load_folder(
    folder: Path,
    preprocess: Preprocess,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    cache_dir: str | None,
    workers: int | None,
    progress: bool | None,
    name: str,
    binarize_seed: int,
    partition_file: Path | None = None,
) -> RawSplits:
    """Scan, decode (or load the cache), split and label one folder of images."""
    _check_options(preprocess, val_fraction, test_fraction)
    entries = scan_images(folder)
    if not entries:
        raise VaekitError(
            f"No {KINDS} images found under {folder.resolve()} (searched at any depth): "
            f"set dataset.root to a folder of images."
        )
    partition = _read_partition(partition_file) if partition_file is not None else None
    entries, folder_codes, class_names = _layout(entries)
    if partition is not None:
        listed = [i for i, entry in enumerate(entries) if Path(entry.relpath).name in partition]
        if len(listed) < len(entries):
            log.warning(
                "skipped %d image files that %s does not list", len(entries) - len(listed), partition_file
            )
        entries = [entries[i] for i in listed]
        class_names = [class_names[i] for i in listed]
        folder_codes = [partition[Path(entry.relpath).name] for entry in entries]
        if not entries:
            raise VaekitError(f"{partition_file} lists none of the images under {folder.resolve()}.")
    named = sorted({c for c in class_names if c is not None})
    index = {class_name: i for i, class_name in enumerate(named)}
    loose = UNLABELLED if named else 0
    labels = np.array([loose if c is None else index[c] for c in class_names], dtype=np.int64)
    if named and (labels == UNLABELLED).any():
        log.warning(
            "%d image files lie outside the class folders of %s: labelled %d",
            int((labels == UNLABELLED).sum()),
            folder,
            UNLABELLED,
        )
    assigned = np.array([-1 if c is None else c for c in folder_codes], dtype=np.int8)
    options = {
        "image_size": preprocess.image_size,
        "channels": preprocess.channels,
        "center_crop": preprocess.center_crop,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
        "partition": _file_digest(partition_file) if partition_file is not None else None,
    }

    def build() -> Decoded:
        images, kept = decode_files(folder, [e.relpath for e in entries], preprocess, workers, progress)
        split = _assign_splits(assigned[kept], val_fraction, test_fraction, split_seed, folder)
        return Decoded(images, labels[kept], split)

    decoded = cached("image_folder", entries, options, cache_dir, build, {"root": str(folder.resolve())})
    return raw_splits(decoded, name, binarize_seed, folder)


def _file_digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def _assign_splits(
    assigned: np.ndarray, val_fraction: float, test_fraction: float, seed: int, folder: Path
) -> np.ndarray:
    """Split codes (N,): those given by split folders or a partition file kept; the rest
    (-1) split by a fixed-seed permutation; a split that received nothing is carved from train."""
    split = assigned.copy()
    free = np.flatnonzero(split < 0)
    if len(free) == len(split):
        count = len(split)
        n_val, n_test = max(1, round(val_fraction * count)), max(1, round(test_fraction * count))
        if count - n_val - n_test < 1:
            raise VaekitError(
                f"{folder.resolve()} holds {count} decodable images: too few for train, val and test splits."
            )
        return split_codes(count, n_val, n_test, seed)
    split[free] = SPLIT_CODES["train"]
    train = np.flatnonzero(split == SPLIT_CODES["train"])
    missing = [name for name in ("val", "test") if not (split == SPLIT_CODES[name]).any()]
    if missing and len(train) > 0:
        fraction = {"val": val_fraction, "test": test_fraction}
        n_val = max(1, round(fraction["val"] * len(train))) if "val" in missing else 0
        n_test = max(1, round(fraction["test"] * len(train))) if "test" in missing else 0
        if len(train) - n_val - n_test >= 1:
            carved = split_codes(len(train), n_val, n_test, seed)
            split[train] = carved
    return split


def raw_splits(decoded: Decoded, name: str, binarize_seed: int, folder: Path) -> RawSplits:
    """RawSplits from decoded arrays and their split codes (file order within each split)."""
    parts = {}
    for split_name in SPLIT_NAMES:
        (where,) = np.nonzero(decoded.split == SPLIT_CODES[split_name])
        if len(where) == 0:
            raise VaekitError(f"The {split_name} split of {folder.resolve()} holds no decodable images.")
        parts[split_name] = torch.from_numpy(np.ascontiguousarray(decoded.images[where]))
        parts[f"{split_name}_labels"] = torch.from_numpy(
            np.ascontiguousarray(decoded.labels[where], dtype=np.int64)
        )
    return RawSplits(**parts, num_levels=256, name=name, binarize_seed=binarize_seed)
