"""Decode once: image files decoded in parallel into uint8 arrays, cached by a fingerprint.

A folder of images is listed (relative path, size, mtime_ns of every file), the list and the
preprocessing options are hashed (blake2b) into a key, and the decoded images (N, C, H, W),
their labels (N,) and split assignment (N,) are stored as .npy files in `<cache>/<key>/`.
A changed file, a new file or another option gives another key, so the cache rebuilds; the
same folder and options load the arrays back (memory-mapped) without decoding anything.
A cache is written into a temporary folder that is renamed into place (`os.replace`), so
a crash leaves no half-written cache under a key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vaekit.errors import VaekitError, describe_os_error

log = logging.getLogger("vaekit")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # compared case-insensitively
CACHE_FORMAT = 1  # part of every key: a new layout of the cache never reads an old one
MAX_FAILED_FRACTION = 0.10  # more undecodable files than this stops the load
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class FileEntry:
    """One image file: its path relative to the scanned folder, size in bytes, mtime in ns."""

    relpath: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Preprocess:
    """How one file becomes a uint8 (C, H, W) array: optional center crop of `center_crop`
    pixels, resize of the short side to `image_size` (antialiased bilinear), center crop to
    image_size x image_size, `channels` 1 (grayscale) or 3 (RGB), and `invert` (255 - x)."""

    image_size: int
    channels: int
    center_crop: int | None = None
    invert: bool = False


@dataclass
class Decoded:
    """Decoded images (N, C, H, W) uint8, labels (N,) int64 and split codes (N,) int8
    (0 train, 1 val, 2 test), in the order of the files that decoded."""

    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray


def scan_images(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[FileEntry]:
    """Every image file at any depth below `root` (extensions case-insensitive), sorted by
    relative path; hidden files and folders (a leading '.') are skipped."""
    entries: list[FileEntry] = []
    suffixes = tuple(ext.lower() for ext in extensions)
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in files:
            if name.startswith(".") or not name.lower().endswith(suffixes):
                continue
            path = os.path.join(folder, name)
            try:
                stat = os.stat(path)
            except OSError:  # a dangling link or a file removed while listing
                continue
            relpath = os.path.relpath(path, root).replace(os.sep, "/")
            entries.append(FileEntry(relpath, stat.st_size, stat.st_mtime_ns))
    entries.sort(key=lambda entry: entry.relpath)
    return entries


def fingerprint(kind: str, entries: Iterable[FileEntry], options: Mapping[str, Any]) -> str:
    """blake2b key (32 hex digits) of the loader `kind`, every file's relative path, size and
    mtime_ns, and the preprocessing and split options."""
    digest = hashlib.blake2b(digest_size=16)
    header = {"format": CACHE_FORMAT, "kind": kind, "options": dict(options)}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for entry in entries:
        digest.update(f"\0{entry.relpath}\0{entry.size}\0{entry.mtime_ns}".encode())
    return digest.hexdigest()


def cache_folder(cache_dir: str | os.PathLike[str] | None, kind: str) -> Path:
    """Where caches of `kind` live: `cache_dir` when given, else
    `$XDG_CACHE_HOME/vaekit/<kind>` (default `~/.cache/vaekit/<kind>`)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "vaekit" / kind


ARRAY_FILES = ("images.npy", "labels.npy", "split.npy")


def read_cache(folder: Path) -> Decoded | None:
    """The arrays cached in `folder` (images memory-mapped, read-only), or None when there is
    no complete cache there."""
    if not all((folder / name).is_file() for name in ARRAY_FILES):
        return None
    try:
        images = np.load(folder / "images.npy", mmap_mode="r", allow_pickle=False)
        labels = np.load(folder / "labels.npy", allow_pickle=False)
        split = np.load(folder / "split.npy", allow_pickle=False)
    except (OSError, ValueError) as error:
        log.warning("ignoring the unreadable cache %s (%s); decoding again", folder, error)
        return None
    if images.ndim != 4 or images.dtype != np.uint8 or not len(images) == len(labels) == len(split):
        log.warning("ignoring the inconsistent cache %s; decoding again", folder)
        return None
    return Decoded(images, labels, split)


def write_cache(folder: Path, decoded: Decoded, meta: Mapping[str, Any]) -> None:
    """Store `decoded` in `folder` atomically: written into a temporary folder beside it,
    then renamed into place. A cache another process finished first is kept as it is."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    except OSError as error:
        raise VaekitError(f"The image cache {describe_os_error(error)} (set dataset.cache_dir?)") from error
    try:
        for name, array in zip(ARRAY_FILES, (decoded.images, decoded.labels, decoded.split), strict=True):
            np.save(temporary / name, np.ascontiguousarray(array), allow_pickle=False)
        (temporary / "meta.json").write_text(json.dumps(dict(meta), indent=1, default=str))
        try:
            os.replace(temporary, folder)
        except OSError:
            if read_cache(folder) is None:  # not a finished cache that won a race: a real error
                raise
    except OSError as error:
        raise VaekitError(f"The image cache {describe_os_error(error)} (set dataset.cache_dir?)") from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def cached(
    kind: str,
    entries: Sequence[FileEntry],
    options: Mapping[str, Any],
    cache_dir: str | os.PathLike[str] | None,
    build: Callable[[], Decoded],
    meta: Mapping[str, Any] | None = None,
) -> Decoded:
    """The arrays for these files and options: from the cache when their fingerprint is
    there, else from `build()` (which decodes), stored before they are returned."""
    key = fingerprint(kind, entries, options)
    folder = cache_folder(cache_dir, kind) / key
    found = read_cache(folder)
    if found is not None:
        log.info("loaded %d decoded images from the cache %s", len(found.images), folder)
        return found
    decoded = build()
    info = {"kind": kind, "options": dict(options), "files": len(entries), "images": len(decoded.images)}
    write_cache(folder, decoded, {**info, **(meta or {})})
    log.info("cached %d decoded images in %s", len(decoded.images), folder)
    # served memory-mapped, as a cache hit is: the decoded copy can be freed before the
    # caller copies out its splits
    return read_cache(folder) or decoded


# ----------------------------------------------------------------------------- decoding


def decode_image(path: str, preprocess: Preprocess) -> np.ndarray:
    """One image file as a uint8 array (C, H, W) after `preprocess`; raises OSError or
    ValueError (PIL's errors) for a file that is not a decodable image."""
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        opened.load()  # decodes now: a truncated or corrupt file fails here
        image = ImageOps.exif_transpose(opened)
    image = _to_channels(image, preprocess.channels)
    if preprocess.invert:
        image = ImageOps.invert(image)
    if preprocess.center_crop is not None:
        image = _center_crop(image, preprocess.center_crop, preprocess.center_crop)
    size = preprocess.image_size
    width, height = image.size
    if min(width, height) != size:
        scale = size / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new, Image.Resampling.BILINEAR, reducing_gap=None)
    image = _center_crop(image, size, size)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # (C, H, W)


def _to_channels(image: Any, channels: int) -> Any:
    """PIL image in mode 'L' (channels=1) or 'RGB' (channels=3); 16-bit and float images are
    scaled to 8 bits, palettes expanded, alpha dropped."""
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit integer or float gray
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    elif image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("L" if channels == 1 else "RGB")


def _center_crop(image: Any, width: int, height: int) -> Any:
    """The central width x height box (clipped to the image)."""
    full_w, full_h = image.size
    width, height = min(width, full_w), min(height, full_h)
    if (width, height) == (full_w, full_h):
        return image
    left, top = (full_w - width) // 2, (full_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def _decode_or_reason(path: str, preprocess: Preprocess) -> np.ndarray | str:
    """decode_image, or the reason (one line) it failed."""
    from PIL import Image

    try:
        return decode_image(path, preprocess)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        return " ".join(str(error).split()) or type(error).__name__


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Automatic decoding threads (workers=None): PIL releases the GIL only inside decode and
# resize, which is ~75% of a 178x218 JPEG's ~0.5 ms but ~30% of a 28x28 PNG's ~0.06 ms (the
# rest is Python). So threads are used only for files slower than this, with 4+ CPUs.
THREADS_FROM_SECONDS_PER_FILE = 200e-6
MAX_THREADS = 8
PROBE_FILES = 64  # decoded first, on the calling thread, to time one file


def decode_files(
    root: Path,
    relpaths: Sequence[str],
    preprocess: Preprocess,
    workers: int | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode `relpaths` under `root`: (images (M, C, H, W) uint8 of the files that decoded,
    indices (M,) of those files into relpaths).

    Each file that fails is named in a warning on the 'vaekit' logger and skipped, and the
    count is logged; more than 10% failures (or all) stop with one sentence. `workers`
    threads decode in parallel (1: on the calling thread; None: chosen from the time the
    first files take, see THREADS_FROM_SECONDS_PER_FILE); `progress` shows a tqdm bar with
    files/s and ETA (None: on a terminal only).
    """
    from tqdm import tqdm

    root = root.resolve()
    size = preprocess.image_size
    images = np.empty((len(relpaths), preprocess.channels, size, size), dtype=np.uint8)
    ok = np.zeros(len(relpaths), dtype=bool)
    failures: list[tuple[str, str]] = []
    paths = [str(root / relpath) for relpath in relpaths]
    disable = None if progress is None else not progress  # None: tqdm shows it on a terminal only
    bar = tqdm(total=len(paths), desc=f"decoding {root}", unit="files", disable=disable, dynamic_ncols=True)

    def store(start: int, results: Sequence[np.ndarray | str]) -> None:
        for index, result in enumerate(results, start):
            if isinstance(result, str):
                failures.append((relpaths[index], result))
                log.warning("skipping %s: not a decodable image (%s)", root / relpaths[index], result)
            else:
                images[index] = result
                ok[index] = True
        bar.update(len(results))

    try:
        probe = min(len(paths), PROBE_FILES if workers is None else 0)
        store(0, _decode_chunk(paths[:1] if probe else [], preprocess))  # untimed: PIL's first-use setup
        started = time.perf_counter()
        store(1, _decode_chunk(paths[1:probe], preprocess))
        if workers is None:
            per_file = (time.perf_counter() - started) / max(probe - 1, 1)
            slow = per_file >= THREADS_FROM_SECONDS_PER_FILE
            workers = min(MAX_THREADS, usable_cpus()) if slow and usable_cpus() >= 4 else 1
        workers = max(1, int(workers))
        rest = len(paths) - probe
        chunk = 256 if workers == 1 else max(1, min(256, rest // (workers * 8)))
        starts = range(probe, len(paths), chunk)
        if workers == 1:
            for start in starts:
                store(start, _decode_chunk(paths[start : start + chunk], preprocess))
        else:
            with ThreadPoolExecutor(workers) as pool:
                batches = pool.map(
                    _decode_chunk, [paths[i : i + chunk] for i in starts], [preprocess] * len(starts)
                )
                for start, results in zip(starts, batches, strict=False):
                    store(start, results)
    finally:
        bar.close()
    if failures:
        log.warning(
            "skipped %d of %d files under %s that could not be decoded", len(failures), len(paths), root
        )
        first, reason = failures[0]
        if len(failures) == len(paths):
            raise VaekitError(
                f"None of the {len(paths)} image files under {root} could be decoded "
                f"(the first, {root / first}, says: {reason.rstrip('.')})."
            )
        if len(failures) > MAX_FAILED_FRACTION * len(paths):
            raise VaekitError(
                f"{len(failures)} of the {len(paths)} image files under {root} could not be decoded "
                f"(more than {MAX_FAILED_FRACTION:.0%}; the first, {root / first}, says: "
                f"{reason.rstrip('.')})."
            )
    (kept,) = np.nonzero(ok)
    return (images if len(kept) == len(paths) else images[kept]), kept


def _decode_chunk(paths: Sequence[str], preprocess: Preprocess) -> list[np.ndarray | str]:
    return [_decode_or_reason(path, preprocess) for path in paths]


def split_codes(count: int, val_size: int, test_size: int, seed: int) -> np.ndarray:
    """Split codes (count,) int8 for `count` examples: a permutation with a fixed seed puts
    the last `test_size` in test, the `val_size` before them in val, the rest in train."""
    import torch

    codes = np.zeros(count, dtype=np.int8)
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).numpy()
    if test_size:
        codes[perm[count - test_size :]] = SPLIT_CODES["test"]
    codes[perm[count - test_size - val_size : count - test_size]] = SPLIT_CODES["val"]
    return codes
