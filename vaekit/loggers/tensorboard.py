"""TensorBoard logging of a run: scalars, image grids and hparams, under the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from vaekit.loggers.base import Logger
from vaekit.loggers.projector import ProjectorWriter

# TensorBoard's CUSTOM SCALARS tab: what a user compares, on one chart each (tags are regexes).
LAYOUT = {
    "vaekit": {
        "NELBO, train and validation": ["Multiline", ["train/nelbo", "val/nelbo"]],
        "reconstruction, train and validation": ["Multiline", ["train/rec", "val/rec"]],
        "KL per level": ["Multiline", [r"train/kl/.*", r"val/kl/.*"]],
    }
}


class RunLogger(Logger):
    """`logger=tensorboard`: a SummaryWriter writing event files into `<run_dir>/tb`."""

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        # purge_step: events at or after this step from an earlier, interrupted writer are
        # hidden, so a resumed run's curves continue without duplicated steps
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step)
        self.writer.add_custom_scalars(LAYOUT)
        self.projector = ProjectorWriter(run_dir / "tb")

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        """One scalar per key, tagged `<prefix>/<key>` (e.g. val/nelbo, train/kl/z1)."""
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def grids(self, grids: dict[str, Tensor], step: int) -> None:
        """Each grid as an image tagged with its name (samples, reconstructions)."""
        for name, grid in grids.items():
            self.writer.add_image(name, grid, step)

    @torch.no_grad()
    def embedding(
        self, means: Tensor, labels: Tensor, images: Tensor, step: int, tag: str = "latent_means"
    ) -> None:
        """Latent means (N, L) for TensorBoard's Projector, with labels (N,) and thumbnails.

        images (N, C, H, W) in [0, 1] become the sprite; labels the metadata column. Files go
        to <run_dir>/tb/<step:05d>/<tag>/ (tensors.tsv, metadata.tsv, sprite.png) and
        tb/projector_config.pbtxt. The sprite is one square image: keep N to ~10,000 or fewer.
        """
        if means.dim() != 2 or labels.shape[0] != means.shape[0] or images.shape[0] != means.shape[0]:
            raise ValueError(
                f"embedding needs means (N, L), labels (N,) and images (N, C, H, W); got "
                f"{tuple(means.shape)}, {tuple(labels.shape)}, {tuple(images.shape)}."
            )
        self.projector.add(means, labels, images.clamp(0, 1), step, tag)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's settings and final metrics, for TensorBoard's HPARAMS tab."""
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        """Flush and close the event files."""
        self.writer.close()
