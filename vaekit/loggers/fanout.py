"""Several loggers behind the one interface: `logger=[tensorboard,mlflow,csv]`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from vaekit.loggers.base import Logger


class FanOut(Logger):
    """Passes every call to each of `loggers`, in order. Image grids are drawn once and shared,
    so every backend shows the same samples and the model is not sampled once per backend."""

    def __init__(self, loggers: Sequence[Logger]) -> None:
        self.loggers = list(loggers)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.scalars(prefix, values, step)

    def grids(self, grids: dict[str, Tensor], step: int) -> None:
        for logger in self.loggers:
            logger.grids(grids, step)

    def embedding(
        self, means: Tensor, labels: Tensor, images: Tensor, step: int, tag: str = "latent_means"
    ) -> None:
        for logger in self.loggers:
            logger.embedding(means, labels, images, step, tag=tag)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.hparams(hparams, metrics)

    def close(self) -> None:
        """Close every logger, even when one of them fails (its error is raised afterwards)."""
        failure: BaseException | None = None
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as error:  # the others still flush their files
                failure = failure or error
        if failure is not None:
            raise failure
