"""vaekit's image grid against torchvision's make_grid: the same pixels."""

import pytest
import torch
from torchvision.utils import make_grid

from vaekit.loggers.grid import image_grid, tile


@pytest.mark.parametrize(
    ("count", "channels", "nrow"), [(1, 1, 8), (5, 1, 2), (64, 1, 8), (7, 3, 3), (10, 3, 10)]
)
def test_tile_is_torchvisions_make_grid(count, channels, nrow):
    images = torch.rand(count, channels, 9, 6, generator=torch.Generator().manual_seed(count))
    expected = make_grid(images, nrow=nrow, padding=2, pad_value=0.5)
    torch.testing.assert_close(tile(images, nrow=nrow, padding=2, pad_value=0.5), expected, rtol=0, atol=0)


def test_small_images_are_enlarged_by_an_integer_factor():
    images = torch.rand(4, 1, 8, 8)
    grid = image_grid(images, nrow=2)
    assert grid.shape == (3, 2 * (32 + 2) + 2, 2 * (32 + 2) + 2)  # 8 -> 32 pixels (factor 4)
    torch.testing.assert_close(
        grid[0, 2:34, 2:34], images[0, 0].repeat_interleave(4, 0).repeat_interleave(4, 1)
    )
