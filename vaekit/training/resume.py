"""`vaekit train resume=RUN_DIR`: continue a run from its last.pt with its saved config.

Only settings that extend or observe the run may change on resume; anything that changes
what is trained (model, prior, posterior, dataset, sizes, optimizer, seed) is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vaekit.errors import VaekitError
from vaekit.schema import upgrade_config
from vaekit.training.checkpoint import check_weights, load_checkpoint

RESUMABLE_KEYS = frozenset(
    {
        "trainer.max_epochs",
        "logger",  # where the rest of the run is recorded
        "loggers.mlflow.tracking_uri",
        "loggers.mlflow.experiment",
        "loggers.mlflow.log_checkpoint",
        "trainer.patience",
        "trainer.progress",
        "trainer.num_threads",
        "trainer.device",
        "trainer.devices",  # any number of processes that divides the batch continues a run
        "trainer.precision",
        "trainer.deterministic",
        "data.in_memory",
        "data.max_device_bytes",
        "data.num_workers",
        "trainer.log_images",
        "trainer.image_every",
        "trainer.images",
        "eval.iw_samples",
        "eval.nelbo_samples",
        "eval.batch_size",
        "eval.seed",
        "trust",
    }
)


def register_resolvers() -> None:
    """`${vaekit_if_resume:${resume},A,B}` -> A when resuming, else B (used for hydra.run.dir)."""
    OmegaConf.register_new_resolver("vaekit_if_resume", _if_resume, replace=True, use_cache=False)


def _if_resume(resume: Any, when_resuming: Any, otherwise: Any) -> Any:
    return when_resuming if resume else otherwise


def override_key(override: str) -> str:
    """'++trainer.patience=5' -> 'trainer.patience'."""
    return override.split("=", 1)[0].lstrip("+~")


def resumed_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, dict[str, Any]]:
    """The saved config of cfg.resume with the allowed overrides applied, and its last.pt."""
    run_dir = Path(cfg.resume)
    if not (run_dir / "last.pt").is_file():
        raise VaekitError(
            f"resume={cfg.resume} holds no last.pt, so there is nothing to resume: "
            f"pass the directory of a vaekit train run."
        )
    changed = [override_key(o) for o in overrides]
    changed = [k for k in changed if k != "resume" and not k.startswith("hydra.")]
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        raise VaekitError(
            f"resume continues the saved configuration, so {refused[0]} cannot change; "
            f"only {', '.join(sorted(RESUMABLE_KEYS))} may be overridden."
        )
    checkpoint = load_checkpoint(run_dir / "last.pt")
    check_weights(checkpoint, run_dir / "last.pt")
    saved = OmegaConf.create(upgrade_config(checkpoint["config"]))
    for key in changed:
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
    saved.resume = str(run_dir)
    return saved, checkpoint
