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
# never hold runs: don't descend (mlartifacts: the mlflow logger's copies of best.pt, under outputs/)
SKIP_FOLDERS = {"tb", ".hydra", "__pycache__", ".git", "mlartifacts"}


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


CHECKPOINT_NAMES = ("best", "last")


@dataclass(frozen=True)
class DeclaredShape:
    """What a model is built for, read from the saved config (dataset.shape, num_levels), so a
    run's model can be rebuilt before (or without) loading its data."""

    shape: tuple[int, ...]
    num_levels: int


class Run:
    """A trained run, loaded: the model of one checkpoint (eval mode, on `device`), the config
    saved in it, the run's metrics.json, and its data, loaded on first use.

    `raw`: the uint8 splits and labels (CPU); `data`: float splits (N, C, H, W) on `device`,
    binarized once for Bernoulli runs, checked against the checksums the checkpoint holds.
    """

    def __init__(
        self,
        run_dir: Path,
        checkpoint: Path,
        epoch: int,
        config: DictConfig,
        model: torch.nn.Module,
        device: torch.device,
        checksums: dict[str, str] | None,
        raw: RawSplits | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.checkpoint = checkpoint  # best.pt or last.pt
        self.epoch = epoch  # the epoch whose weights the checkpoint holds
        self.config = config  # the resolved config saved in the checkpoint
        self.model = model
        self.device = device
        self._checksums = checksums
        self._raw = raw
        self._data: DeviceData | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r}, {self.checkpoint.name}, epoch {self.epoch}, {self.device})"

    @property
    def raw(self) -> RawSplits:
        """The uint8 splits and labels (CPU), loaded from the dataset on first use."""
        if self._raw is None:
            self._raw = _config_errors(self.checkpoint, _build_dataset, self.config)
        return self._raw

    @property
    def data(self) -> DeviceData:
        """The float splits on `device` (val and test binarized once where the likelihood asks),
        checked against the checkpoint's checksums: one sentence if the files changed."""
        if self._data is None:
            from vaekit.build import device_data

            data = device_data(self.raw, self.model, self.device, self.config.get("data"))
            check_data_unchanged({"data_checksums": self._checksums}, data, self.checkpoint)
            self._data = data
        return self._data

    @property
    def metrics(self) -> dict[str, Any] | None:
        """metrics.json as written when the run ended (None while it runs, or if unreadable)."""
        try:
            return json.loads((self.run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            return None


LoadedRun = Run  # the name the commands used before the Python API


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


def _build_dataset(config: DictConfig) -> RawSplits:
    from vaekit.build import build_dataset

    return build_dataset(config)


def _config_errors(path: Path, build: Any, *args: Any) -> Any:
    """build(*args), with an unusable saved config (an OmegaConf error) as one sentence."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return build(*args)
    except OmegaConfBaseException as error:
        raise VaekitError(f"The config saved in {path} cannot be used ({error}).") from error


def declared_shape(config: DictConfig) -> DeclaredShape | None:
    """The example shape and levels the saved config declares (every built-in dataset does);
    None when it declares neither, e.g. a loader of the user's own: then the data is loaded."""
    shape, levels = config.dataset.get("shape"), config.dataset.get("num_levels")
    try:
        return DeclaredShape(tuple(int(size) for size in shape), int(levels))
    except (TypeError, ValueError):
        return None


def load_run(
    run_dir: Path,
    device_name: str = "auto",
    trust: Sequence[str] = (),
    which: str = "best",
    lazy: bool = False,
    device_option: str = "--device",
) -> Run:
    """Rebuild the model of `run_dir/<which>.pt` (best or last) from the resolved config saved
    inside it; with `lazy`, the data is loaded (and checked) on first use of `.raw` or `.data`
    (a conditional VAE's at once: the number of classes it is built for comes from the labels).

    The checkpoint is read with weights_only=True, and its config may name only vaekit's and
    torch.optim's classes (plus modules under the `trust` prefixes: vaekit/trust.py), so a
    crafted file cannot run code. `device_option` names the device setting in errors.
    Raises VaekitError (one sentence) for a folder that is not a run, a missing or
    unreadable checkpoint, or one that does not match the model its config describes.
    """
    if which not in CHECKPOINT_NAMES:
        raise VaekitError(f"which must be best or last (the checkpoint to load), not {which!r}.")
    run_dir = require_run_dir(run_dir)
    path = run_dir / f"{which}.pt"
    if not path.is_file():
        raise VaekitError(
            f"{run_dir} has no {which}.pt (the run failed or has not finished its first epoch yet)."
        )
    from omegaconf import OmegaConf

    from vaekit.build import build_model, resolve_device
    from vaekit.schema import upgrade_config
    from vaekit.training.checkpoint import check_weights, load_checkpoint, load_weights
    from vaekit.trust import check_trusted

    device = resolve_device(device_name, device_option)

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
    config = _config_errors(path, lambda: OmegaConf.create(upgrade_config(checkpoint["config"])))
    _config_errors(path, _locate_dataset_root, config, run_dir)
    # a conditional VAE's size follows the data's classes: its data is loaded to build it
    lazy = lazy and not _config_errors(path, lambda: bool(config.model.get("conditional")))
    shape = _config_errors(path, declared_shape, config) if lazy else None
    raw = None if shape is not None else _config_errors(path, _build_dataset, config)
    model = _config_errors(path, build_model, config, raw if raw is not None else shape)
    load_weights(model, checkpoint["model"], path)
    model.to(device).eval()
    epoch = checkpoint["fit_state"]["epoch"]
    run = Run(run_dir, path, epoch, config, model, device, checkpoint.get("data_checksums"), raw)
    if not lazy:
        run.data  # noqa: B018 - loads and checks the data now: a command fails before it starts
    return run
