"""Write a transformed copy of MNIST's IDX files, an out-of-distribution set of MNIST's shape.

    python scripts/transformed_mnist.py ../shared/data /tmp/mnist_rotated --transform rot90
    python scripts/transformed_mnist.py ../shared/data /tmp/mnist_inverted --transform invert
    vaekit evaluate RUN --ood dataset=mnist dataset.root=/tmp/mnist_rotated

Reads ROOT/MNIST/raw/*-images-idx3-ubyte (N x 28 x 28 uint8) and writes the same layout under
OUT, each image transformed: `rot90` turns it a quarter counter-clockwise, `invert` maps x to
255 - x, `shuffle` permutes the pixels with one fixed permutation (seed 0). Labels are copied.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

IMAGE_FILES = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")
LABEL_FILES = ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")
HEADER_BYTES = 16  # magic, count, rows, cols: four big-endian int32


def transform(images: np.ndarray, name: str) -> np.ndarray:
    """images: (N, 28, 28) uint8 -> the same shape and dtype, transformed by `name`."""
    if name == "rot90":
        return np.rot90(images, k=1, axes=(1, 2))
    if name == "invert":
        return 255 - images
    if name == "shuffle":
        flat = images.reshape(len(images), -1)
        permutation = np.random.default_rng(0).permutation(flat.shape[1])
        return flat[:, permutation].reshape(images.shape)
    raise ValueError(f"unknown transform {name!r}: choose rot90, invert or shuffle")


def write_transformed(root: Path, out: Path, name: str) -> None:
    """Copy ROOT/MNIST/raw to OUT/MNIST/raw with every image transformed by `name`."""
    source, target = root / "MNIST" / "raw", out / "MNIST" / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for file in IMAGE_FILES:
        raw = (source / file).read_bytes()
        header, pixels = raw[:HEADER_BYTES], np.frombuffer(raw[HEADER_BYTES:], dtype=np.uint8)
        images = transform(pixels.reshape(-1, 28, 28), name)
        (target / file).write_bytes(header + np.ascontiguousarray(images).tobytes())
    for file in LABEL_FILES:
        shutil.copyfile(source / file, target / file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder holding MNIST/raw (MNIST's dataset.root)")
    parser.add_argument("out", type=Path, help="folder to write MNIST/raw under")
    parser.add_argument("--transform", choices=("rot90", "invert", "shuffle"), default="rot90")
    args = parser.parse_args()
    write_transformed(args.root, args.out, args.transform)
    print(f"wrote {args.out / 'MNIST' / 'raw'} ({args.transform})")


if __name__ == "__main__":
    main()
