"""The one interface a logger offers the Trainer and `vaekit train`.

A logger records scalars per epoch, image grids, (TensorBoard only) latent embeddings, and at
the end the run's settings with its final metrics. A new backend (wandb, say) subclasses
`Logger` and overrides what it can store; the rest stays a no-op.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vaekit.loggers.grid import image_grid
from vaekit.rng import own_rng


class Logger:
    """Where a run's curves, grids and final metrics go. Subclasses implement `scalars` and
    `hparams`; the other methods do nothing unless overridden."""

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        """One value per key, named `<prefix>/<key>` (train/nelbo, val/kl/z1), at epoch `step`."""
        raise NotImplementedError

    def images(self, model: nn.Module, x: Tensor, step: int, num: int = 64, draw: bool = False) -> None:
        """Grids of `num` samples and of data beside reconstructions (see `model_grids`)."""
        if len(x.shape) == 4:  # only image-shaped data (N, C, H, W)
            self.grids(model_grids(model, x, num, draw), step)

    def grids(self, grids: dict[str, Tensor], step: int) -> None:
        """Named (C, H, W) image grids in [0, 1] at `step`; loggers without images ignore them."""

    def embedding(
        self, means: Tensor, labels: Tensor, images: Tensor, step: int, tag: str = "latent_means"
    ) -> None:
        """Latent means (N, L) with labels and thumbnails; only TensorBoard has a viewer for them."""

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's settings and final metrics, once, when it has been evaluated."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush what is buffered; the logger is not used afterwards."""


@torch.no_grad()
def model_grids(model: nn.Module, x: Tensor, num: int = 64, draw: bool = False) -> dict[str, Tensor]:
    """{"samples", "reconstructions"}: grids of `num` samples, and of x beside its reconstruction
    (pairs along each row): the means of p(x|z), or with `draw` samples from it.

    The draws leave the global RNG streams as they were, so logging images never changes the
    noise that training sees."""
    was_training = model.training
    model.eval()
    with own_rng(x.device):
        samples = image_grid(model.sample(num, draw=draw))
        x = x[: num // 2]
        pairs = torch.stack([x, model.reconstruct(x, draw=draw)], dim=1).flatten(0, 1)
        reconstructions = image_grid(pairs)
    model.train(was_training)
    return {"samples": samples, "reconstructions": reconstructions}
