"""scripts/transformed_mnist.py: the OOD sets of the README's MNIST comparison, read back by
torchvision's own MNIST loader."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_fake_mnist
from torchvision.datasets import MNIST

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "transformed_mnist.py"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("rot90", lambda a: np.rot90(a, 1, (1, 2))),
        ("invert", lambda a: 255 - a),
    ],
)
def test_transformed_mnist_is_read_by_torchvision_with_every_image_transformed(tmp_path, name, expected):
    write_fake_mnist(tmp_path / "src")
    out = tmp_path / name
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "src"), str(out), "--transform", name],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for train in (True, False):
        source, target = MNIST(tmp_path / "src", train=train), MNIST(out, train=train)
        assert np.array_equal(target.data.numpy(), expected(source.data.numpy()))
        assert np.array_equal(target.targets.numpy(), source.targets.numpy())


def test_shuffle_permutes_the_pixels_of_every_image_alike(tmp_path):
    write_fake_mnist(tmp_path / "src")
    source_root, out = str(tmp_path / "src"), str(tmp_path / "s")
    command = [sys.executable, str(SCRIPT), source_root, out, "--transform", "shuffle"]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    source = MNIST(tmp_path / "src", train=False).data.flatten(1).numpy()
    target = MNIST(tmp_path / "s", train=False).data.flatten(1).numpy()
    assert not np.array_equal(source, target)
    permutation = np.random.default_rng(0).permutation(784)  # one fixed permutation for all images
    assert np.array_equal(target, source[:, permutation])
