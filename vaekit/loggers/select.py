"""`logger=...`: which loggers a run writes to, checked before anything is built.

The setting is one name (`logger=mlflow`) or a list (`logger=[tensorboard,mlflow]`); each
backend's module is imported only when it is chosen (mlflow's import takes over a second).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vaekit.errors import VaekitError
from vaekit.loggers.base import Logger

KNOWN = ("tensorboard", "mlflow", "csv")


def logger_names(setting: Any) -> list[str]:
    """The chosen loggers in order, each once; an unknown name is one sentence."""
    names = [setting] if isinstance(setting, str) else list(setting or [])
    for name in names:
        if name not in KNOWN:
            raise VaekitError(
                f"logger={name} is not a logger vaekit knows: choose from {', '.join(KNOWN)}, "
                f"or several as logger=[tensorboard,mlflow]."
            )
    return list(dict.fromkeys(names))


def check_loggers(cfg: DictConfig) -> None:
    """Refuse unknown loggers, and mlflow when it is not installed, before training starts."""
    names = logger_names(cfg.get("logger", "tensorboard"))
    if "mlflow" in names:
        try:
            import mlflow  # noqa: F401  (imported once; the logger's own import is then free)
        except ImportError as error:
            raise VaekitError(
                f"logger=mlflow needs the mlflow package ({error}): pip install 'vaekit[mlflow]'."
            ) from None


def make_logger(cfg: DictConfig, run_dir: Path, resumed_epoch: int | None, config: dict[str, Any]) -> Logger:
    """The configured loggers behind one Logger. `resumed_epoch` (the checkpoint's epoch when
    resuming) makes each continue its earlier record without repeating later epochs; `config`
    is the resolved config that mlflow logs as params."""
    purge_step = None if resumed_epoch is None else resumed_epoch + 1
    loggers: list[Logger] = []
    for name in logger_names(cfg.get("logger", "tensorboard")):
        if name == "tensorboard":
            from vaekit.loggers.tensorboard import RunLogger

            loggers.append(RunLogger(run_dir, purge_step=purge_step))
        elif name == "csv":
            from vaekit.loggers.csv import CsvLogger

            loggers.append(CsvLogger(run_dir, purge_step=purge_step))
        else:
            from vaekit.loggers.mlflow import MlflowLogger

            loggers.append(MlflowLogger(run_dir, cfg.loggers.mlflow, config, resumed_epoch is not None))
    if len(loggers) == 1:
        return loggers[0]
    from vaekit.loggers.fanout import FanOut

    return FanOut(loggers)
