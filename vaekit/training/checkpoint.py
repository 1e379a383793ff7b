"""Checkpoints: atomic writes, and loads that never unpickle code (weights_only=True)."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from vaekit.errors import VaekitError

CHECKPOINT_FORMAT = 1  # the layout of the dict that Trainer.checkpoint() writes


def save_atomic(obj: Any, path: Path, also: Path | None = None) -> None:
    """torch.save to a temporary file beside `path`, then os.replace it into place.

    A reader (or a crash at any moment) sees either the old complete file or the new one.
    With `also`, the same bytes are published under that name too (a hard link where the
    file system allows, else a copy), so best.pt costs no second serialisation.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    if also is not None:
        twin = also.with_name(f".{also.name}.tmp")
        twin.unlink(missing_ok=True)
        try:
            os.link(tmp, twin)
        except OSError:
            shutil.copyfile(tmp, twin)
        os.replace(twin, also)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with weights_only=True; an unreadable file, or one of a format this
    vaekit does not know, raises one VaekitError sentence."""
    if not path.is_file():
        raise VaekitError(f"No checkpoint at {path}.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VaekitError(f"{path} is not a readable vaekit checkpoint ({first_line}).") from error
    if not isinstance(checkpoint, dict):
        raise VaekitError(f"{path} is not a vaekit checkpoint (it holds a {type(checkpoint).__name__}).")
    found = checkpoint.get("format")
    if found is None:
        raise VaekitError(f"{path} is not a vaekit checkpoint (it records no checkpoint format).")
    if found != CHECKPOINT_FORMAT:
        raise VaekitError(
            f"{path} has checkpoint format {found!r}, but this vaekit reads format {CHECKPOINT_FORMAT}: "
            f"use the vaekit version that wrote it."
        )
    return checkpoint
