"""Shared helpers: run the real `vaekit` command, write small IDX files, read event files."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Settings that keep a CLI run to a few seconds on a laptop CPU.
FAST = ["trainer.max_epochs=3", "eval.iw_samples=8", "trainer.progress=false", "eval.nelbo_samples=2"]


@pytest.fixture(autouse=True)
def _logging_handlers_stay_with_their_test():
    """In-process runs (cli.main, vaekit.train) let Hydra attach log handlers to the stderr
    that pytest captures for that test; left in place they write into a closed stream later."""
    loggers = [logging.getLogger(), logging.getLogger("vaekit")]
    before = [list(logger.handlers) for logger in loggers]
    yield
    for logger, handlers in zip(loggers, before, strict=True):
        for handler in logger.handlers[:]:
            if handler not in handlers:
                logger.removeHandler(handler)


def compose_train(*overrides: str):
    """The config `vaekit train OVERRIDES` composes, in-process (no run directory)."""
    from hydra import compose, initialize_config_dir

    from vaekit.commands.train import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def vaekit_executable() -> str:
    """The installed `vaekit` console script (beside this Python, else on PATH)."""
    beside = Path(sys.executable).parent / "vaekit"
    found = str(beside) if beside.exists() else shutil.which("vaekit")
    if found is None:
        pytest.fail("the vaekit command is not installed: pip install '.[test]'")
    return found


def run_vaekit(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `vaekit` command in a subprocess and capture its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [vaekit_executable(), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run `vaekit <argv>` in-process; assert exit 1 and return its one stderr line."""
    from vaekit import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("vaekit: error: ")
    return lines[0]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format MNIST uses (big-endian dims after a magic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fake_mnist(root: Path, folder: str = "MNIST", n_train: int = 120, n_test: int = 40) -> None:
    """Small random MNIST-format files under root/<folder>/raw: blobs of bright pixels."""
    rng = np.random.default_rng(0)
    raw = root / folder / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for i in range(n):
            r, c = rng.integers(4, 20, size=2)
            images[i, r : r + 8, c : c + 8] = rng.integers(128, 256, size=(8, 8))
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, size=n))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny digits run with a 2-D latent (so --manifold and --scatter work), trained by the
    real command once per session and shared by the evaluate and sample tests."""
    tmp = tmp_path_factory.mktemp("trained")
    run = tmp / "run"
    settings = [*FAST, "model.latent_dim=2", "trainer.deterministic=true"]  # deterministic: used for real
    done = run_vaekit("train", *settings, f"hydra.run.dir={run}", cwd=tmp)
    assert done.returncode == 0, done.stderr
    return run


@pytest.fixture
def fake_mnist(tmp_path: Path) -> Path:
    write_fake_mnist(tmp_path / "data")
    return tmp_path / "data"


def read_events(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], set[str]]:
    """Scalars {tag: [(step, value)]} and image tags from every event file under run_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    images: set[str] = set()
    for folder in {p.parent for p in run_dir.rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        images.update(acc.Tags()["images"])
    return scalars, images
