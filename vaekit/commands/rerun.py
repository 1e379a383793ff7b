"""A rerun of a job directory continues the run that is there (auto-resume).

submitit requeues a preempted or timed-out job into the same job directory, and a user may run
the same sweep again; either way `vaekit train` finds the run's last.pt. When the config saved in
it is this job's config (only settings that `resume=` may change can differ), the run continues
from it as `vaekit train resume=DIR` would; a run that already ended is not trained again; a run
of another config is refused in one sentence, so nothing of it is overwritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vaekit.build import check_settings, resolve_device
from vaekit.errors import VaekitError
from vaekit.schema import upgrade_config
from vaekit.training.checkpoint import check_weights, load_checkpoint
from vaekit.training.resume import RESUMABLE_KEYS
from vaekit.trust import check_trusted

ENDED = ("finished", "early_stopped")  # metrics.json statuses of a run with nothing left to train
IGNORED_KEYS = ("resume",)  # set in the saved config of a run that was resumed before


@dataclass
class Rerun:
    """What a rerun continues: the config and last.pt to resume, or `metrics` of a run that
    already ended with this config (then nothing is trained)."""

    cfg: DictConfig
    checkpoint: dict[str, Any]
    metrics: dict[str, Any] | None = None


def differences(saved: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (plain data)."""
    if not (isinstance(saved, dict) and isinstance(new, dict)):
        return [] if saved == new else [prefix]
    keys = [*saved, *(key for key in new if key not in saved)]
    found = []
    for key in keys:
        path = f"{prefix}.{key}" if prefix else str(key)
        found += differences(saved.get(key), new.get(key), path)
    return found


def resumable(key: str) -> bool:
    """True for a key that `resume=` may change (or one under such a key, e.g. a logger's)."""
    return key in IGNORED_KEYS or any(key == k or key.startswith(f"{k}.") for k in RESUMABLE_KEYS)


def find_rerun(cfg: DictConfig, resolved: dict[str, Any], run_dir: Path) -> Rerun | None:
    """The run to continue in `run_dir` (None when it holds no last.pt). `resolved` is this job's
    config as checkpoints save it. Raises VaekitError for a run of another config."""
    path = run_dir / "last.pt"
    if not path.is_file():
        return None
    checkpoint = load_checkpoint(path)
    check_weights(checkpoint, path)
    saved = upgrade_config(checkpoint["config"])
    changed = differences(saved, resolved)
    refused = [key for key in changed if not resumable(key)]
    if refused:
        key = refused[0]
        there, here = OmegaConf.select(OmegaConf.create(saved), key), OmegaConf.select(cfg, key)
        raise VaekitError(
            f"{run_dir} already holds a run: continue it with `vaekit train resume={run_dir}`, or train "
            f"into another directory (hydra.run.dir=...), since its config differs from this one in "
            f"{key} ({there} there, {here} here)."
        )
    continued = OmegaConf.create(resolved)
    continued.resume = str(run_dir)
    metrics = ended_metrics(run_dir) if not [key for key in changed if key not in IGNORED_KEYS] else None
    if metrics is None:  # the same checks as `resume=`, before anything of the run changes
        from vaekit.training.trainer import check_resumable  # the loop's module: imported late

        check_trusted(checkpoint["config"], path, list(cfg.trust))
        check_resumable(checkpoint, path)
        check_settings(continued)
        resolve_device(continued.trainer.device)
    return Rerun(continued, checkpoint, metrics)


def ended_metrics(run_dir: Path) -> dict[str, Any] | None:
    """metrics.json of a run that finished or stopped early, else None (still to train)."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("status") in ENDED else None
