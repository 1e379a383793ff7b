"""Checkpoint files: atomic publication, weights-only loading, refusal of crafted pickles."""

import pickle

import pytest
import torch

from vaekit.errors import VaekitError
from vaekit.training.checkpoint import (
    CHECKPOINT_FORMAT,
    BackgroundSaver,
    content_digest,
    load_checkpoint,
    save_atomic,
)


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


def test_the_digest_is_sha256_and_blake2b_digests_of_earlier_versions_still_load(tmp_path):
    contents = {"format": CHECKPOINT_FORMAT, "model": {"w": torch.randn(4, 3)}, "epoch": 2}
    save_atomic(contents, tmp_path / "new.pt")
    stored = torch.load(tmp_path / "new.pt", weights_only=True)["digest"]
    assert stored == content_digest(contents) and len(stored) == 64
    # a file as vaekit wrote it before the switch: the 128-bit BLAKE2b of the same leaves
    old = {**contents, "digest": content_digest(contents, "blake2b")}
    assert len(old["digest"]) == 32
    torch.save(old, tmp_path / "old.pt")
    assert torch.equal(load_checkpoint(tmp_path / "old.pt")["model"]["w"], contents["model"]["w"])
    for name, digest in (("new", stored), ("old", old["digest"])):  # one changed value, either kind
        torch.save({**contents, "epoch": 3, "digest": digest}, tmp_path / f"{name}-changed.pt")
        with pytest.raises(VaekitError, match="is damaged"):
            load_checkpoint(tmp_path / f"{name}-changed.pt")


def test_the_background_saver_writes_what_was_submitted_in_order_and_reports_a_failed_write(tmp_path):
    saver = BackgroundSaver()
    state = {"format": CHECKPOINT_FORMAT, "model": {"w": torch.ones(3)}, "fit_state": {"epoch": 1}}
    saver.submit(state, tmp_path / "last.pt", also=tmp_path / "best.pt")
    state["fit_state"]["epoch"] = 99  # the caller goes on changing its own dicts at once
    saver.submit({**state, "fit_state": {"epoch": 2}}, tmp_path / "last.pt")
    saver.wait()
    assert load_checkpoint(tmp_path / "best.pt")["fit_state"]["epoch"] == 1
    assert load_checkpoint(tmp_path / "last.pt")["fit_state"]["epoch"] == 2
    (tmp_path / "taken" / "inside").mkdir(parents=True)  # a directory where the file should go
    saver.submit(state, tmp_path / "taken")
    with pytest.raises(OSError):
        saver.wait()  # the worker's error, raised in the caller
    saver.wait()  # reported once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "taken"]
