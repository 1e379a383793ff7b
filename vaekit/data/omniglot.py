"""Omniglot (Lake et al., 2015) from torchvision's on-disk layout of PNG files.

    <root>/omniglot-py/images_background/<alphabet>/<character>/*.png   (30 alphabets, 964 characters)
    <root>/omniglot-py/images_evaluation/<alphabet>/<character>/*.png   (20 alphabets, 659 characters)

(`<root>` may also hold the two folders itself.) The background set is train and val (a
fixed-seed split of its images), the evaluation set is test: test characters, and their
alphabets, are never seen in training. The 105x105 binary drawings (black on white) are
inverted so strokes are bright, like MNIST, and resized with antialiasing to image_size;
decoded once and cached (vaekit/data/cache.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vaekit.data.cache import SPLIT_CODES, Decoded, FileEntry, Preprocess, cached, decode_files, scan_images
from vaekit.data.folder import raw_splits
from vaekit.data.splits import BINARIZE_SEED, RawSplits, check_declared
from vaekit.errors import VaekitError

log = logging.getLogger("vaekit")

OMNIGLOT_FOLDER = "omniglot-py"
OMNIGLOT_SETS = ("images_background", "images_evaluation")  # train + val, test


def _find_base(root: Path) -> Path | None:
    for base in (root / OMNIGLOT_FOLDER, root):
        if all((base / name).is_dir() for name in OMNIGLOT_SETS):
            return base
    return None


def _download(root: Path) -> None:
    import torchvision.datasets  # imported here: only a download needs it

    for background in (True, False):
        try:
            torchvision.datasets.Omniglot(root=str(root), background=background, download=True)
        except (RuntimeError, OSError) as error:  # network errors (URLError is an OSError)
            raise VaekitError(
                f"Could not download Omniglot (no network?): unpack images_background.zip and "
                f"images_evaluation.zip into {(root / OMNIGLOT_FOLDER).resolve()} and run with "
                f"dataset.download=false."
            ) from error


def _characters(entries: Sequence[FileEntry]) -> tuple[list[FileEntry], list[str]]:
    """Files at <set>/<alphabet>/<character>/<file>.png and their '<set>/<alphabet>/<character>'."""
    used = [entry for entry in entries if entry.relpath.count("/") == 3]
    if len(used) < len(entries):
        log.warning(
            "ignored %d Omniglot files outside <alphabet>/<character>/ folders", len(entries) - len(used)
        )
    return used, [entry.relpath.rsplit("/", 1)[0] for entry in used]


def load_omniglot(
    root: str = "data",
    image_size: int = 28,
    val_size: int = 1280,
    split_seed: int = 14,
    download: bool = False,
    cache_dir: str | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    name: str = "omniglot",
    shape: Sequence[int] | None = None,
    num_levels: int | None = None,
    binarize_seed: int = BINARIZE_SEED,
) -> RawSplits:
    """Omniglot as uint8 (N, 1, image_size, image_size), strokes bright, 256 levels.

    Train and val: the background set's 19,280 images, `val_size` of them drawn for val by a
    permutation with `split_seed`; test: the evaluation set's 13,180. Labels are character
    indices over both sets (background characters 0..963 in sorted alphabet/character
    order, then evaluation characters 964..1622). `shape` and `num_levels`, when given, must
    match: (1, image_size, image_size) and 256. Cached under `cache_dir` (default
    `$XDG_CACHE_HOME/vaekit/omniglot`).
    """
    root_path = Path(root).expanduser()
    base = _find_base(root_path)
    if base is None and download:
        _download(root_path)
        base = _find_base(root_path)
    if base is None:
        raise VaekitError(
            f"Omniglot not found: put the folders {' and '.join(OMNIGLOT_SETS)} (unpacked from "
            f"torchvision's zips) into {(root_path / OMNIGLOT_FOLDER).resolve()}, set dataset.root to "
            f"the folder that holds {OMNIGLOT_FOLDER}, or pass dataset.download=true on a machine with "
            f"network access."
        )
    if image_size < 1:
        raise VaekitError(f"dataset.image_size must be at least 1, not {image_size}.")
    entries: list[FileEntry] = []
    for set_name in OMNIGLOT_SETS:
        found = scan_images(base / set_name, extensions=(".png",))
        if not found:
            raise VaekitError(
                f"{(base / set_name).resolve()} holds no PNG images (<alphabet>/<character>/*.png)."
            )
        entries += [FileEntry(f"{set_name}/{e.relpath}", e.size, e.mtime_ns) for e in found]
    entries, characters = _characters(entries)
    index = {character: i for i, character in enumerate(sorted(set(characters)))}  # background sorts first
    labels = np.array([index[character] for character in characters], dtype=np.int64)
    is_test = np.array([c.startswith(OMNIGLOT_SETS[1]) for c in characters], dtype=bool)
    n_background = int((~is_test).sum())
    if not 0 < val_size < n_background:
        raise VaekitError(
            f"dataset.val_size must be between 1 and {n_background - 1} "
            f"(the background set holds {n_background} images), not {val_size}."
        )
    preprocess = Preprocess(image_size, channels=1, invert=True)
    options = {"image_size": image_size, "val_size": val_size, "split_seed": split_seed, "invert": True}

    def build() -> Decoded:
        images, kept = decode_files(base, [e.relpath for e in entries], preprocess, workers, progress)
        test = is_test[kept]
        split = np.full(len(kept), SPLIT_CODES["test"], dtype=np.int8)
        background = np.flatnonzero(~test)
        if not 0 < val_size < len(background):
            raise VaekitError(
                f"dataset.val_size must be below the {len(background)} decodable background images, "
                f"not {val_size}."
            )
        perm = torch.randperm(len(background), generator=torch.Generator().manual_seed(split_seed)).numpy()
        split[background] = SPLIT_CODES["train"]
        split[background[perm[-val_size:]]] = SPLIT_CODES["val"]
        return Decoded(images, labels[kept], split)

    decoded = cached("omniglot", entries, options, cache_dir, build, {"root": str(base.resolve())})
    return check_declared(raw_splits(decoded, name, binarize_seed, base), shape, num_levels)
