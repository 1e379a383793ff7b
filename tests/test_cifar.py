"""CIFAR-10 from python-pickle batches written here: exact arrays, the fixed-seed split, a
restricted unpickler that refuses code, one-sentence errors, and the real CLI end to end."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_vaekit

from vaekit.data import load_cifar10
from vaekit.data.cifar import CIFAR_FOLDER, TEST_BATCH, TRAIN_BATCHES
from vaekit.errors import VaekitError
from vaekit.trust import check_trusted

N = 60  # images per batch: 300 for train + val, 60 for test


def write_cifar(
    root: Path, protocol: int = 4, str_keys: bool = False, seed: int = 0, n: int = N
) -> dict[str, tuple]:
    """Five training batches and a test batch of n random images each, in CIFAR's format."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(y) for y in rng.integers(0, 10, size=n)]
        batch = {"batch_label": f"{name} of 6", "data": data, "labels": labels, "filenames": ["x.png"] * n}
        if not str_keys:
            batch = {key.encode(): value for key, value in batch.items()}
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle, protocol=protocol)
        written[name] = (data, np.array(labels))
    return written


@pytest.mark.parametrize("protocol, str_keys", [(2, False), (4, False), (5, False), (2, True)])
def test_batches_load_exactly_with_a_fixed_seed_split(tmp_path, protocol, str_keys):
    written = write_cifar(tmp_path, protocol, str_keys)
    raw = load_cifar10(str(tmp_path), val_size=50, split_seed=3, shape=[3, 32, 32], num_levels=256)
    assert raw.train.shape == (250, 3, 32, 32) and raw.val.shape == (50, 3, 32, 32)
    assert raw.test.shape == (N, 3, 32, 32) and raw.train.dtype == torch.uint8
    assert raw.train_labels.dtype == torch.int64 and raw.num_levels == 256 and raw.name == "cifar10"
    # rows are 1024 red, 1024 green, 1024 blue values of a row-major 32x32 image
    test_data, test_labels = written[TEST_BATCH]
    assert torch.equal(raw.test, torch.from_numpy(test_data.reshape(N, 3, 32, 32)))
    assert raw.test[7, 1, 2, 5] == test_data[7, 1024 + 2 * 32 + 5]
    assert torch.equal(raw.test_labels, torch.from_numpy(test_labels))
    # train + val: the five batches in order, permuted by the seed exactly as documented
    all_data = np.concatenate([written[name][0] for name in TRAIN_BATCHES]).reshape(-1, 3, 32, 32)
    all_labels = np.concatenate([written[name][1] for name in TRAIN_BATCHES])
    perm = torch.randperm(5 * N, generator=torch.Generator().manual_seed(3))
    assert torch.equal(raw.train, torch.from_numpy(all_data)[perm[:-50]])
    assert torch.equal(raw.val, torch.from_numpy(all_data)[perm[-50:]])
    assert torch.equal(raw.val_labels, torch.from_numpy(all_labels)[perm[-50:]])


def test_the_split_is_deterministic_and_follows_the_seed(tmp_path):
    write_cifar(tmp_path)
    a, b = (load_cifar10(str(tmp_path), val_size=50, split_seed=3) for _ in range(2))
    c = load_cifar10(str(tmp_path), val_size=50, split_seed=4)
    assert torch.equal(a.train, b.train) and torch.equal(a.val_labels, b.val_labels)
    assert not torch.equal(a.val, c.val)


def test_batches_directly_under_root_are_found(tmp_path):
    write_cifar(tmp_path)
    raw = load_cifar10(str(tmp_path / CIFAR_FOLDER), val_size=50)
    assert raw.test.shape[0] == N


class _System:
    """Unpickles as os.system('touch <marker>')."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_a_pickle_that_asks_for_os_system_is_refused_before_it_runs(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / CIFAR_FOLDER / "data_batch_2"
    batch.write_bytes(pickle.dumps({b"data": _System(marker), b"labels": [0]}))
    with pytest.raises(VaekitError) as error:
        load_cifar10(str(tmp_path), val_size=50)
    message = str(error.value)
    assert (
        message.startswith(str(batch.resolve())) and ".system, which a CIFAR-10 batch never holds" in message
    )
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence
    assert not marker.exists()


def test_builtins_are_refused_too(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / CIFAR_FOLDER / TEST_BATCH).write_bytes(pickle.dumps({b"data": _Eval()}))
    with pytest.raises(VaekitError, match=r"test_batch asks to load builtins\.eval, which"):
        load_cifar10(str(tmp_path), val_size=50)


def test_a_missing_batch_is_named(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / CIFAR_FOLDER / "data_batch_3").unlink()
    with pytest.raises(VaekitError, match=r"data_batch_3 is missing: CIFAR-10 needs data_batch_1, "):
        load_cifar10(str(tmp_path))


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"\x80\x04garbage", "is not a readable CIFAR-10 batch"),
        (pickle.dumps([1, 2, 3]), "holds a list, not the dict of a CIFAR-10 batch"),
        (
            pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
            r"uint8 array \(N, 3072\)",
        ),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "2 integers 0..9"),
    ],
)
def test_a_damaged_batch_is_one_sentence_naming_it(tmp_path, content, expected):
    write_cifar(tmp_path)
    (tmp_path / CIFAR_FOLDER / "data_batch_1").write_bytes(content)
    with pytest.raises(VaekitError, match=expected) as error:
        load_cifar10(str(tmp_path), val_size=50)
    assert "data_batch_1" in str(error.value)


def test_missing_root_val_size_and_declared_shape_are_one_sentence(tmp_path):
    with pytest.raises(VaekitError, match="CIFAR-10 not found: unpack cifar-10-python.tar.gz"):
        load_cifar10(str(tmp_path / "nowhere"))
    write_cifar(tmp_path)
    with pytest.raises(VaekitError, match=r"dataset.val_size must be between 1 and 299 .* not 5000"):
        load_cifar10(str(tmp_path))
    with pytest.raises(VaekitError, match=r"dataset.shape is \[1, 32, 32\] but the cifar10 files hold"):
        load_cifar10(str(tmp_path), val_size=50, shape=[1, 32, 32])


@pytest.mark.parametrize(
    "model", [["model=vae", "model.latent_dim=4"], ["model=topdown", "model.latent_dims=[4,2]"]]
)
def test_vaekit_train_on_cifar10_end_to_end(tmp_path, monkeypatch, model):
    write_cifar(tmp_path / "data", n=12)  # 48 train, 12 val, 12 test
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = tmp_path / "run"
    done = run_vaekit(
        "train",
        "dataset=cifar10",
        f"dataset.root={tmp_path / 'data'}",
        "dataset.val_size=12",
        "trainer.max_epochs=1",
        "trainer.batch_size=16",
        "eval.iw_samples=2",
        "eval.nelbo_samples=1",
        "trainer.progress=false",
        "net=conv",
        "net.channels=8",
        "net.hidden_dim=32",
        *model,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["test_nelbo"]) and 0 < metrics["test_bpd"] < 12
    config = torch.load(run_dir / "best.pt", weights_only=True)["config"]
    assert config["dataset"]["_target_"] == "vaekit.data.load_cifar10"
    assert config["likelihood"]["_target_"].endswith("DiscretizedLogisticLikelihood")
    assert config["likelihood"]["num_levels"] == 256
    check_trusted(config, run_dir / "best.pt")  # the saved config rebuilds: its target is allowed
