"""Time `dataset=image_folder` on 60,000 28x28 PNGs: the first load (decode, with the bar)
and the second (from the cache).

    OMP_NUM_THREADS=1 python scripts/bench_image_folder.py [--mnist /work/shared/data/MNIST/raw]
        [--folder /tmp/vaekit_bench/mnist_png] [--workers N] [--compare-workers]

The folder (one class folder per digit) is written from MNIST's training IDX files if it is
absent; the cache goes to a fresh folder beside it, so the first load always decodes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vaekit.data import load_image_folder
from vaekit.data.cache import Preprocess, decode_files, scan_images


def read_idx(path: Path) -> np.ndarray:
    """A uint8 IDX file (MNIST's format) as an array."""
    data = path.read_bytes()
    ndim = data[3]
    dims = np.frombuffer(data[4 : 4 + 4 * ndim], dtype=">u4")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def build_folder(mnist_raw: Path, folder: Path) -> None:
    """MNIST's 60,000 training images as <folder>/<digit>/<index>.png (written once)."""
    from PIL import Image

    images = read_idx(mnist_raw / "train-images-idx3-ubyte")
    labels = read_idx(mnist_raw / "train-labels-idx1-ubyte")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for digit in range(10):
        (partial / str(digit)).mkdir(parents=True)
    start = time.perf_counter()
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image, "L").save(partial / str(label) / f"{index:05d}.png")
    partial.rename(folder)
    print(f"wrote {len(images)} PNGs to {folder} in {time.perf_counter() - start:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist", type=Path, default=Path("/work/shared/data/MNIST/raw"))
    parser.add_argument("--folder", type=Path, default=Path("/tmp/vaekit_bench/mnist_png"))
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: one per CPU)")
    parser.add_argument(
        "--compare-workers", action="store_true", help="also time a bare decode with 1, 2 and 4 threads"
    )
    args = parser.parse_args()
    if not args.folder.is_dir():
        build_folder(args.mnist, args.folder)
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=args.folder.parent))
    settings = dict(image_size=28, channels=1, cache_dir=str(cache), workers=args.workers)
    try:
        start = time.perf_counter()
        first = load_image_folder(str(args.folder), progress=True, **settings)
        decode_s = time.perf_counter() - start
        start = time.perf_counter()
        second = load_image_folder(str(args.folder), progress=True, **settings)
        load_s = time.perf_counter() - start
        assert all(first.images(s).equal(second.images(s)) for s in ("train", "val", "test"))
        count = sum(first.images(s).shape[0] for s in ("train", "val", "test"))
        print(
            f"image_folder, {count} PNGs 28x28: first load (decode + cache) {decode_s:.2f} s "
            f"({count / decode_s:,.0f} files/s), second load (cache) {load_s:.2f} s"
        )
        if args.compare_workers:
            relpaths = [entry.relpath for entry in scan_images(args.folder)][:20000]
            for workers in (1, 2, 4):
                start = time.perf_counter()
                decode_files(args.folder, relpaths, Preprocess(28, 1), workers=workers, progress=False)
                seconds = time.perf_counter() - start
                print(f"bare decode of {len(relpaths)} files with {workers} thread(s): {seconds:.2f} s")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    sys.exit(0 if load_s < 2 else 1)


if __name__ == "__main__":
    main()
