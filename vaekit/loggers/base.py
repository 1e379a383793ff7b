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

    def images(
        self,
        model: nn.Module,
        x: Tensor,
        step: int,
        num: int = 64,
        draw: bool = False,
        y: Tensor | None = None,
    ) -> None:
        """Grids of `num` samples and of data beside reconstructions (see `model_grids`); `y` (N,):
        the labels of x, for a conditional model."""
        if len(x.shape) == 4:  # only image-shaped data (N, C, H, W)
            self.grids(model_grids(model, x, num, draw, y), step)

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


# A conditional model's sample grid: one row of this many samples per class, for at most
# GRID_CLASSES classes (0, 1, ...)
GRID_PER_CLASS = 8
GRID_CLASSES = 16


@torch.no_grad()
def model_grids(
    model: nn.Module, x: Tensor, num: int = 64, draw: bool = False, y: Tensor | None = None
) -> dict[str, Tensor]:
    """{"samples", "reconstructions"}: grids of `num` samples, and of x beside its reconstruction
    (pairs along each row): the means of p(x|z), or with `draw` samples from it. A model=ebm's
    samples are Langevin chains from fresh noise, and "buffer_samples" shows its replay buffer.

    A conditional model (model.conditional=true) reconstructs x with its labels y (N,), and its
    sample grid holds one row of GRID_PER_CLASS samples per class 0, 1, ... (at most GRID_CLASSES).
    The draws leave the global RNG streams as they were, so logging images never changes the
    noise that training sees."""
    was_training = model.training
    model.eval()
    conditional = getattr(model, "conditional", False)
    with own_rng(x.device):
        if conditional:
            classes = torch.arange(min(model.num_classes, GRID_CLASSES), device=x.device)
            labels = classes.repeat_interleave(GRID_PER_CLASS)  # (rows * GRID_PER_CLASS,)
            samples = image_grid(model.sample(labels.shape[0], draw=draw, y=labels), nrow=GRID_PER_CLASS)
        else:
            samples = image_grid(model.sample(num, draw=draw))
        x = x[: num // 2]
        given = {"y": y[: num // 2]} if conditional and y is not None else {}  # x's labels
        pairs = torch.stack([x, model.reconstruct(x, draw=draw, **given)], dim=1).flatten(0, 1)
        reconstructions = image_grid(pairs)
        grids = {"samples": samples, "reconstructions": reconstructions}
        if hasattr(model, "buffer_samples"):  # model=ebm: its replay buffer beside the fresh chains
            grids["buffer_samples"] = image_grid(model.buffer_samples(num))
    model.train(was_training)
    return grids
