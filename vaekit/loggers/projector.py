"""TensorBoard's Projector files for a set of embeddings, written directly.

The Projector plugin reads `<logdir>/projector_config.pbtxt` (a text ProjectorConfig) and,
per embedding, a tensors.tsv (N rows of L tab-separated floats), a metadata.tsv (one label per
line) and a sprite: the N thumbnails tiled row by row, without gaps, into one square image of
ceil(sqrt(N)) tiles a side. torch's `SummaryWriter.add_embedding` writes the same files, but
builds the sprite in float64 RGB and compresses it at zlib's default level, several times
slower than one uint8 image (grey tiles stay one channel) at zlib's fastest level.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format
from PIL import Image
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
from torch import Tensor

PNG_COMPRESS_LEVEL = 1  # zlib's fastest: thumbnails of digits and photos barely gain from more


def sprite_image(images: Tensor) -> Image.Image:
    """images (N, C, H, W) in [0, 1], C = 1 or 3 -> one (n H, n W) image, n = ceil(sqrt N),
    tile i at row i // n, column i % n; the tiles past N are black."""
    count, channels, height, width = images.shape
    side = math.ceil(math.sqrt(count))
    tiles = torch.zeros(side * side, channels, height, width, dtype=torch.uint8)
    tiles[:count] = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    grid = tiles.view(side, side, channels, height, width).permute(0, 3, 1, 4, 2)
    pixels = grid.reshape(side * height, side * width, channels).numpy()
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, "L" if channels == 1 else "RGB")


class ProjectorWriter:
    """Adds embeddings under `logdir` and keeps projector_config.pbtxt listing all of them."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.config = ProjectorConfig()

    def add(self, means: Tensor, labels: Tensor, images: Tensor, step: int, tag: str) -> Path:
        """Write one embedding (means (N, L), labels (N,), images (N, C, H, W)) into
        <logdir>/<step:05d>/<tag>/ and list it in the config; returns that folder."""
        subdir = f"{step:05d}/{tag}"
        folder = self.logdir / subdir
        folder.mkdir(parents=True, exist_ok=True)
        # %.9g: every float32 reads back exactly
        np.savetxt(folder / "tensors.tsv", means.detach().float().cpu().numpy(), fmt="%.9g", delimiter="\t")
        names = "".join(f"{int(label)}\n" for label in labels.detach().cpu().reshape(-1).tolist())
        (folder / "metadata.tsv").write_text(names)
        sprite_image(images).save(folder / "sprite.png", compress_level=PNG_COMPRESS_LEVEL)
        self._list(subdir, tag, step, width=images.shape[3], height=images.shape[2])
        return folder

    def _list(self, subdir: str, tag: str, step: int, width: int, height: int) -> None:
        """Add the embedding to the config (replacing one of the same name) and rewrite it."""
        name = f"{tag}:{step:05d}"
        kept = [info for info in self.config.embeddings if info.tensor_name != name]
        del self.config.embeddings[:]
        self.config.embeddings.extend(kept)
        info = self.config.embeddings.add()
        info.tensor_name = name
        info.tensor_path = f"{subdir}/tensors.tsv"
        info.metadata_path = f"{subdir}/metadata.tsv"
        info.sprite.image_path = f"{subdir}/sprite.png"
        info.sprite.single_image_dim.extend([width, height])
        path = self.logdir / "projector_config.pbtxt"
        path.write_text(text_format.MessageToString(self.config))
