"""Datasets: the digits split, torchvision loaders on IDX files written here, binarization."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import write_fake_mnist

from vaekit.data import DeviceData, load_digits, load_torchvision
from vaekit.errors import VaekitError


def test_digits_match_scikit_learn_and_the_books_split():
    from sklearn.datasets import load_digits as sk_load_digits

    raw = load_digits()
    reference = sk_load_digits()
    assert (raw.train.shape[0], raw.val.shape[0], raw.test.shape[0]) == (1000, 350, 447)
    assert raw.shape == (1, 8, 8) and raw.num_levels == 17
    images = torch.cat([raw.train, raw.val, raw.test]).reshape(-1, 64).numpy()
    np.testing.assert_array_equal(images, reference.data.astype(np.uint8))
    labels = torch.cat([raw.train_labels, raw.val_labels, raw.test_labels]).numpy()
    np.testing.assert_array_equal(labels, reference.target)


def test_torchvision_loader_reads_idx_files_and_splits_with_a_fixed_seed(tmp_path):
    write_fake_mnist(tmp_path, n_train=100, n_test=30)
    a = load_torchvision("MNIST", root=str(tmp_path), val_size=20, split_seed=3)
    b = load_torchvision("MNIST", root=str(tmp_path), val_size=20, split_seed=3)
    assert a.train.shape == (80, 1, 28, 28) and a.val.shape == (20, 1, 28, 28)
    assert a.test.shape == (30, 1, 28, 28) and a.train.dtype == torch.uint8
    assert torch.equal(a.val, b.val)  # same seed, same split
    # train and val partition the official training file
    combined = torch.cat([a.train, a.val]).reshape(100, -1).float().sum(1).sort().values
    from torchvision.datasets import MNIST

    original = MNIST(str(tmp_path), train=True).data.reshape(100, -1).float().sum(1).sort().values
    torch.testing.assert_close(combined, original)


def test_missing_files_give_one_sentence_naming_files_and_folder(tmp_path):
    with pytest.raises(VaekitError) as info:
        load_torchvision("FashionMNIST", root=str(tmp_path))
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and str(tmp_path / "FashionMNIST" / "raw") in message
    assert "\n" not in message


def test_val_size_larger_than_the_file_is_refused(tmp_path):
    write_fake_mnist(tmp_path, n_train=50, n_test=10)
    with pytest.raises(VaekitError, match="val_size"):
        load_torchvision("MNIST", root=str(tmp_path), val_size=10000)


def epoch_batches(data: DeviceData, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches, drawn as the trainer draws them."""
    perm = data.permutation(generator)
    return [
        data.train_batch(perm, step, batch_size, generator)
        for step in range(data.num_train_batches(batch_size))
    ]


def test_dynamic_binarization_fresh_for_train_fixed_for_val():
    raw = load_digits()
    raw = dataclasses.replace(raw, binarize_seed=7)
    a = DeviceData(raw, torch.device("cpu"), binarize=True)
    b = DeviceData(raw, torch.device("cpu"), binarize=True)
    other = DeviceData(dataclasses.replace(raw, binarize_seed=8), torch.device("cpu"), binarize=True)
    assert not torch.equal(a.test, other.test)  # the dataset's seed decides the binarized test set
    assert torch.equal(a.val, b.val) and torch.equal(a.test, b.test)
    assert set(a.val.unique().tolist()) == {0.0, 1.0}
    # the binarized mean matches the intensities' mean (Bernoulli(p) has mean p)
    torch.testing.assert_close(a.test.mean(), (raw.test.float() / 16).mean(), atol=0.01, rtol=0)
    gen = torch.Generator().manual_seed(0)
    first = torch.cat(epoch_batches(a, 64, gen))
    second = torch.cat(epoch_batches(a, 64, gen))
    assert first.shape == (1000, 1, 8, 8) and set(first.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(first.sum(0), second.sum(0))  # a new binarization (and order)


def test_epoch_is_a_permutation_of_the_training_split():
    raw = load_digits()
    data = DeviceData(raw, torch.device("cpu"), binarize=False)
    batches = epoch_batches(data, 64, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [64] * 15 + [40]
    assert data.num_train_batches(64) == 16
    seen = torch.cat(batches).reshape(1000, -1)
    expected = data.train.reshape(1000, -1)
    assert torch.equal(seen.sum(0), expected.sum(0))  # every example exactly once
    assert not torch.equal(seen, expected)  # but shuffled
    assert float(data.train.max()) == 1.0 and float(data.train.min()) == 0.0
