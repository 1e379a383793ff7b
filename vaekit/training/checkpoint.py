"""Checkpoints: atomic writes with a digest of their contents, and loads that never unpickle
code (weights_only=True) and notice a damaged file."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

from vaekit.errors import VaekitError

CHECKPOINT_FORMAT = 1  # the layout of the dict that Trainer.checkpoint() writes


def content_digest(obj: Any, algorithm: str = "sha256") -> str:
    """Hex digest of every leaf of a nested dict/list checkpoint: each tensor's key path, dtype,
    shape and bytes, and the repr of every other value. Order matters, as in the file.

    SHA-256 (64 hex digits) is what vaekit writes: with the CPU's SHA instructions it hashes a
    few GB/s, several times BLAKE2b's rate here. "blake2b" (128-bit, 32 hex digits) is what
    earlier versions wrote; `stored_digest_matches` tells the two apart by length.
    """
    digest = hashlib.sha256() if algorithm == "sha256" else hashlib.blake2b(digest_size=16)
    for key_path, leaf in _leaves(obj, ""):
        digest.update(key_path.encode())
        if isinstance(leaf, torch.Tensor):
            flat = leaf.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{flat.dtype}{tuple(leaf.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy())  # the buffer itself, no copy
        else:
            digest.update(repr(leaf).encode())
    return digest.hexdigest()


def stored_digest_matches(stored: str, contents: Any) -> bool:
    """Whether `stored` (a checkpoint's "digest") is the digest of `contents`: SHA-256 for 64 hex
    digits, else the BLAKE2b of checkpoints written before vaekit switched."""
    algorithm = "sha256" if len(stored) == 64 else "blake2b"
    return stored == content_digest(contents, algorithm)


def _leaves(obj: Any, prefix: str) -> Any:
    """(key path, leaf) pairs of nested dicts, lists and tuples, depth first."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(value, f"{prefix}/{key}")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _leaves(value, f"{prefix}/{index}")
    else:
        yield prefix, obj


def save_atomic(obj: Any, path: Path, also: Path | None = None) -> None:
    """torch.save to a temporary file beside `path`, then os.replace it into place; a dict
    gets a "digest" of its contents (`content_digest`), which load_checkpoint checks.

    A reader (or a crash at any moment) sees either the old complete file or the new one.
    With `also`, the same bytes are published under that name too (a hard link where the
    file system allows, else a copy), so best.pt costs no second serialisation.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(obj, dict):
        contents = {key: value for key, value in obj.items() if key != "digest"}
        obj = {**contents, "digest": content_digest(contents)}
    twin = also.with_name(f".{also.name}.tmp") if also is not None else None
    try:
        torch.save(obj, tmp)
        if twin is not None:
            twin.unlink(missing_ok=True)
            try:
                os.link(tmp, twin)
            except OSError:
                shutil.copyfile(tmp, twin)
            os.replace(twin, also)
        os.replace(tmp, path)
    except BaseException:  # a full disk or a stop: the old files stay, no temporary ones
        tmp.unlink(missing_ok=True)
        if twin is not None:
            twin.unlink(missing_ok=True)
        raise


class BackgroundSaver:
    """`save_atomic` in a worker thread, one file at a time, so the epoch after it need not wait
    for serialisation, digest and disk.

    `submit` first waits for the write before it (files appear in the order submitted) and
    copies the snapshot's dicts and lists, so the caller may change them afterwards; its tensors
    must be the caller's own copies (Trainer.checkpoint makes them). A failed write raises its
    error in the caller at the next `submit` or `wait`. The worker is not a daemon: a process
    that ends finishes the file it was writing, and the rename keeps a crash atomic anyway.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, obj: Any, path: Path, also: Path | None = None) -> None:
        """Start writing `obj` to `path` (and `also`) once the previous write is done."""
        self.wait()
        snapshot = _containers_copied(obj)

        def write() -> None:
            try:
                save_atomic(snapshot, path, also=also)
            except BaseException as error:  # handed to the caller's thread
                self._error = error

        self._thread = threading.Thread(target=write, name="vaekit-checkpoint")
        self._thread.start()

    def wait(self) -> None:
        """Block until the submitted file is in place; raise the error of a failed write."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def _containers_copied(obj: Any) -> Any:
    """Nested dicts, lists and tuples copied; their leaves (tensors, numbers, strings) shared."""
    if isinstance(obj, dict):
        return {key: _containers_copied(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_containers_copied(value) for value in obj)
    return obj


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with weights_only=True; an unreadable file, or one of a format this
    vaekit does not know, raises one VaekitError sentence."""
    if not path.is_file():
        raise VaekitError(f"No checkpoint at {path}.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a damaged archive fails in many ways (zip, pickle, storage)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VaekitError(f"{path} is not a readable vaekit checkpoint ({first_line}).") from error
    if not isinstance(checkpoint, dict):
        raise VaekitError(f"{path} is not a vaekit checkpoint (it holds a {type(checkpoint).__name__}).")
    stored = checkpoint.pop("digest", None)  # older checkpoints have none
    if stored is not None and not (isinstance(stored, str) and stored_digest_matches(stored, checkpoint)):
        raise VaekitError(
            f"{path} is damaged: its contents do not match the digest written with them "
            f"(a changed or corrupted file); use another checkpoint or retrain."
        )
    found = checkpoint.get("format")
    if found is None:
        raise VaekitError(f"{path} is not a vaekit checkpoint (it records no checkpoint format).")
    if found != CHECKPOINT_FORMAT:
        raise VaekitError(
            f"{path} has checkpoint format {found!r}, but this vaekit reads format {CHECKPOINT_FORMAT}: "
            f"use the vaekit version that wrote it."
        )
    return checkpoint


def check_weights(checkpoint: dict[str, Any], path: Path) -> None:
    """Refuse, in one sentence, a checkpoint without the parts every command reads: the model's
    tensors, the saved config and the epoch."""
    model, config, fit_state = checkpoint.get("model"), checkpoint.get("config"), checkpoint.get("fit_state")
    if not isinstance(config, dict):
        raise VaekitError(f"{path} is not a vaekit checkpoint (it holds no saved config).")
    if not isinstance(model, dict) or not all(isinstance(t, torch.Tensor) for t in model.values()):
        raise VaekitError(f"{path} is not a vaekit checkpoint (it holds no model weights).")
    epoch = fit_state.get("epoch") if isinstance(fit_state, dict) else None
    if type(epoch) is not int or epoch < 0:
        raise VaekitError(f"{path} is not a usable vaekit checkpoint (its fit_state has no epoch count).")


def load_weights(module: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """module.load_state_dict(state); a state of another shape or with other keys (a checkpoint
    of another model) is one sentence naming the first mismatch."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__).rstrip(".")
        raise VaekitError(f"{path} does not fit the model its config describes ({detail}).") from error
