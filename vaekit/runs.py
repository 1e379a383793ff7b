"""Run directories that `vaekit train` wrote: find them, and load one's model and data.

A run directory holds `.hydra/` (config.yaml, overrides.yaml), `train.log`, `tb/`, and once
an epoch has finished `best.pt` and `last.pt`; `metrics.json` appears when the run ends
(or fails). A multirun folder holds one such directory per job (0/, 1/, ...).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaekit.errors import VaekitError

if TYPE_CHECKING:  # torch and the model stack are imported only when a run is loaded
    import torch
    from omegaconf import DictConfig

    from vaekit.data import DeviceData, RawSplits

RUN_MARKERS = (".hydra", "metrics.json", "best.pt", "last.pt")
SKIP_FOLDERS = {"tb", ".hydra", "__pycache__", ".git"}  # never hold runs: don't descend


def is_run_dir(path: Path) -> bool:
    """True when `path` looks like a directory that `vaekit train` wrote."""
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


def find_runs(root: Path) -> list[Path]:
    """Every run directory at or below `root` (a run, a multirun folder, outputs/), sorted."""
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    for folder, subfolders, _ in os.walk(root):
        here = Path(folder)
        if here != root and is_run_dir(here):
            found.append(here)
            subfolders.clear()  # runs do not nest
            continue
        subfolders[:] = [name for name in subfolders if name not in SKIP_FOLDERS]
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list[Any]:
    """Sort 2/ before 10/ (multirun job numbers)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]


def require_run_dir(path: Path) -> Path:
    """`path` if it is a run directory, else one VaekitError sentence saying what it is."""
    if not path.exists():
        raise VaekitError(f"{path} does not exist.")
    if not path.is_dir():
        raise VaekitError(f"{path} is not a directory: pass a run directory that `vaekit train` wrote.")
    if is_run_dir(path):
        return path
    runs = find_runs(path)
    if runs:
        raise VaekitError(
            f"{path} is not a run directory but holds {len(runs)} run(s): pass one of them, "
            f"e.g. {runs[0]} (or compare them all with `vaekit report {path}`)."
        )
    raise VaekitError(f"{path} is not a vaekit run directory (no .hydra/, metrics.json or best.pt inside).")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file, then os.replace); non-finite numbers become null."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(_finite_or_null(payload), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:  # a full disk or a stop: leave no temporary file behind
        tmp.unlink(missing_ok=True)
        raise


def _finite_or_null(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null, at any depth."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def _first_sentence(error: BaseException) -> str:
    """The first sentence of the underlying cause (torch's messages run to a paragraph)."""
    cause = error.__cause__ or error
    text = " ".join(str(cause).split()) or type(cause).__name__
    if text.startswith("Weights only load failed"):  # a pickle of objects, maybe of code
        found = re.search(r"unsupported GLOBAL (\S+)", text)
        named = f" ({found.group(1)})" if found else ""
        return f"it holds Python objects{named} that vaekit will not unpickle, since they could run code"
    head, dot, _ = text.partition(". ")
    return (head if dot else text).rstrip(".")


@dataclass
class LoadedRun:
    """A run's best checkpoint rebuilt: its model (eval mode) and data on one device."""

    run_dir: Path
    checkpoint: Path
    epoch: int  # the epoch whose weights best.pt holds
    config: DictConfig  # the resolved config saved in the checkpoint
    model: torch.nn.Module
    raw: RawSplits  # uint8 splits and labels (CPU)
    data: DeviceData  # float splits on the device (binarized once for Bernoulli runs)
    device: torch.device


def _training_cwd(run_dir: Path) -> Path | None:
    """The working directory `vaekit train` ran in (from .hydra/hydra.yaml), if recorded."""
    from omegaconf import OmegaConf

    try:
        return Path(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.cwd)
    except Exception:  # an optional hint only; older or hand-made runs may lack the file
        return None


def _locate_dataset_root(config: DictConfig, run_dir: Path) -> None:
    """A relative dataset.root was relative to where training ran: find it from here too."""
    root = config.dataset.get("root")
    if root is None or Path(root).expanduser().is_absolute() or Path(root).exists():
        return
    cwd = _training_cwd(run_dir)
    if cwd is not None and (cwd / root).exists():
        config.dataset.root = str(cwd / root)


def check_data_unchanged(checkpoint: dict[str, Any], data: Any, path: Path) -> None:
    """The data on disk must be what the checkpoint was trained and scored on, split by split
    (checkpoints of older vaekit versions hold no checksums and pass)."""
    from vaekit.data.memory import changed_splits

    changed = changed_splits(checkpoint.get("data_checksums"), data.checksums)
    if changed:
        raise VaekitError(
            f"The {' and '.join(changed)} split{'s' if len(changed) > 1 else ''} of the data on disk "
            f"{'differ' if len(changed) > 1 else 'differs'} from what {path} was trained and scored on "
            f"(checksums differ: the dataset's files changed): restore them, or retrain."
        )


def load_run(run_dir: Path, device_name: str = "auto", trust: Sequence[str] = ()) -> LoadedRun:
    """Rebuild the model of `run_dir/best.pt` from the resolved config saved inside it.

    The checkpoint is read with weights_only=True, and its config may name only vaekit's and
    torch.optim's classes (plus modules under the `trust` prefixes: vaekit/trust.py), so a
    crafted file cannot run code.
    Raises VaekitError (one sentence) for a folder that is not a run, a missing or
    unreadable checkpoint, or one that does not match the model its config describes.
    """
    run_dir = require_run_dir(run_dir)
    path = run_dir / "best.pt"
    if not path.is_file():
        raise VaekitError(
            f"{run_dir} has no best.pt (the run failed or has not finished its first epoch yet)."
        )
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from vaekit.build import build_dataset, build_model, device_data, resolve_device
    from vaekit.schema import upgrade_config
    from vaekit.training.checkpoint import check_weights, load_checkpoint, load_weights
    from vaekit.trust import check_trusted

    device = resolve_device(device_name, "--device")

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: noise for the user
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = load_checkpoint(path, "cpu")
    except VaekitError as error:
        raise VaekitError(
            f"{path} is not a readable vaekit checkpoint ({_first_sentence(error)})."
        ) from error
    check_weights(checkpoint, path)
    check_trusted(checkpoint["config"], path, trust)
    try:
        config = OmegaConf.create(upgrade_config(checkpoint["config"]))
        _locate_dataset_root(config, run_dir)
        raw = build_dataset(config)
        model = build_model(config, raw)
    except OmegaConfBaseException as error:
        raise VaekitError(f"The config saved in {path} cannot be used ({error}).") from error
    load_weights(model, checkpoint["model"], path)
    model.to(device).eval()
    data = device_data(raw, model, device, config.get("data"))
    check_data_unchanged(checkpoint, data, path)
    epoch = checkpoint["fit_state"]["epoch"]
    return LoadedRun(run_dir, path, epoch, config, model, raw, data, device)
