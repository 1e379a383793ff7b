"""Checkpoints: atomic writes with a digest of their contents, and loads that never unpickle
code (weights_only=True) and notice a damaged file."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from vaekit.errors import VaekitError

CHECKPOINT_FORMAT = 1  # the layout of the dict that Trainer.checkpoint() writes


def content_digest(obj: Any) -> str:
    """BLAKE2b (128-bit, hex) of every leaf of a nested dict/list checkpoint: each tensor's
    key path, dtype, shape and bytes, and the repr of every other value. Order matters, as in
    the file."""
    digest = hashlib.blake2b(digest_size=16)
    for key_path, leaf in _leaves(obj, ""):
        digest.update(key_path.encode())
        if isinstance(leaf, torch.Tensor):
            flat = leaf.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{flat.dtype}{tuple(leaf.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy())  # the buffer itself, no copy
        else:
            digest.update(repr(leaf).encode())
    return digest.hexdigest()


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
    if stored is not None and stored != content_digest(checkpoint):
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
