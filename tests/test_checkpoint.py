"""Checkpoint files: atomic publication, weights-only loading, refusal of crafted pickles."""

import pickle

import pytest
import torch

from vaekit.errors import VaekitError
from vaekit.training.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_atomic


def test_save_atomic_publishes_the_same_bytes_under_both_names(tmp_path):
    state = {"format": CHECKPOINT_FORMAT, "model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3}
    save_atomic(state, tmp_path / "last.pt", also=tmp_path / "best.pt")
    assert (tmp_path / "last.pt").read_bytes() == (tmp_path / "best.pt").read_bytes()
    save_atomic(
        {"format": CHECKPOINT_FORMAT, "model": {"w": torch.zeros(1)}, "epoch": 4}, tmp_path / "last.pt"
    )
    # replacing last.pt leaves the earlier best.pt intact (a new file, not an overwrite)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 3
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch MARKER_FILE_FROM_PICKLE",))


def test_a_crafted_pickle_is_refused_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "best.pt"
    torch.save({"model": _RunsCode()}, path)
    with pytest.raises(VaekitError, match="not a readable vaekit checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "MARKER_FILE_FROM_PICKLE").exists()
    path.write_bytes(pickle.dumps(_RunsCode()))  # a bare pickle, not even a zip archive
    with pytest.raises(VaekitError):
        load_checkpoint(path)
    assert not (tmp_path / "MARKER_FILE_FROM_PICKLE").exists()


def test_truncated_and_missing_checkpoints_give_one_sentence(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"model": {"w": torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(VaekitError, match="not a readable vaekit checkpoint"):
        load_checkpoint(path)
    with pytest.raises(VaekitError, match="No checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_checkpoint_without_a_known_format_is_one_sentence(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(VaekitError, match="is not a vaekit checkpoint \\(it records no checkpoint format\\)"):
        load_checkpoint(path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(VaekitError, match="is not a vaekit checkpoint \\(it holds a Tensor\\)"):
        load_checkpoint(path)
