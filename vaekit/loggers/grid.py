"""Image grids for TensorBoard and PNG figures: one rule for both.

Same layout as torchvision's `make_grid` (which `tests/test_grid.py` checks it against), without
importing torchvision, whose import costs over a second of every run's start-up.
"""

from __future__ import annotations

import math

from torch import Tensor

MIN_IMAGE_SIDE = 28  # small images (8x8 digits) are enlarged so TensorBoard shows them


def tile(images: Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> Tensor:
    """(N, C, H, W) -> (C', H', W'): `nrow` images per row, `padding` pixels of `pad_value`
    around each; one-channel images become three-channel (grey). A single image is returned
    as it is, without padding (as make_grid does)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[0] == 1:
        return images[0].clone()
    count, channels, height, width = images.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    cell_h, cell_w = height + padding, width + padding
    grid = images.new_full((channels, rows * cell_h + padding, columns * cell_w + padding), pad_value)
    for k in range(count):
        y, x = divmod(k, columns)
        top, left = y * cell_h + padding, x * cell_w + padding
        grid[:, top : top + height, left : left + width] = images[k]
    return grid


def image_grid(images: Tensor, nrow: int = 8) -> Tensor:
    """(N, C, H, W) in [0, 1] -> (C', H', W') grid on the CPU, enlarged by an integer factor if small."""
    images = images.detach().float().clamp(0, 1).cpu()
    factor = math.ceil(MIN_IMAGE_SIDE / images.shape[-1])
    if factor > 1:
        images = images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return tile(images, nrow=nrow, padding=2, pad_value=0.5)
