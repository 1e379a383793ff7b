"""Encoder and decoder networks. A net option is a small factory that knows the data shape.

encoder(shape)                      : x (B, *shape) -> h (B, out_dim)
decoder(latent_dim, shape, params)  : z (B, L) -> params (B, *shape, num_params)
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from vaekit.errors import VaekitError


class Reshape(nn.Module):
    """Reshape the non-batch dimensions to `shape`."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


class ChannelsLast(nn.Module):
    """(B, C * P, H, W) -> (B, C, H, W, P): parameters per pixel in the last dimension."""

    def __init__(self, channels: int, num_params: int) -> None:
        super().__init__()
        self.channels = channels
        self.num_params = num_params

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        return x.reshape(b, self.channels, self.num_params, h, w).permute(0, 1, 3, 4, 2)


def mlp(sizes: list[int], final_activation: bool) -> nn.Sequential:
    """Linear layers with LeakyReLU between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if final_activation or i < len(sizes) - 2:
            layers.append(nn.LeakyReLU())
    return nn.Sequential(*layers)


class MLPNets:
    """Fully connected nets with `num_layers` hidden layers of `hidden_dim` units."""

    def __init__(self, hidden_dim: int = 256, num_layers: int = 2) -> None:
        if hidden_dim < 1 or num_layers < 1:
            raise VaekitError("net.hidden_dim and net.num_layers must be at least 1.")
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers

    def encoder(self, shape: tuple[int, ...]) -> nn.Module:
        """x (B, *shape) -> h (B, hidden_dim)."""
        sizes = [math.prod(shape)] + [self.hidden_dim] * self.num_layers
        return nn.Sequential(nn.Flatten(), mlp(sizes, final_activation=True))

    def decoder(self, latent_dim: int, shape: tuple[int, ...], num_params: int) -> nn.Module:
        """z (B, latent_dim) -> params (B, *shape, num_params)."""
        sizes = [latent_dim] + [self.hidden_dim] * self.num_layers
        sizes.append(math.prod(shape) * num_params)
        return nn.Sequential(mlp(sizes, final_activation=False), Reshape(*shape, num_params))


class ConvNets:
    """Two stride-2 convolutions (H and W divisible by 4), mirrored in the decoder."""

    def __init__(self, channels: int = 32, hidden_dim: int = 256) -> None:
        if channels < 1 or hidden_dim < 1:
            raise VaekitError("net.channels and net.hidden_dim must be at least 1.")
        self.channels = channels
        self.hidden_dim = hidden_dim

    @staticmethod
    def _check(shape: tuple[int, ...]) -> tuple[int, int, int]:
        if len(shape) != 3 or shape[1] % 4 or shape[2] % 4:
            raise VaekitError(
                f"net=conv needs images whose height and width are divisible by 4, "
                f"not shape {list(shape)}: use net=mlp."
            )
        return shape[0], shape[1], shape[2]

    def encoder(self, shape: tuple[int, ...]) -> nn.Module:
        """x (B, C, H, W) -> h (B, hidden_dim)."""
        c, h, w = self._check(shape)
        ch = self.channels
        return nn.Sequential(
            nn.Conv2d(c, ch, 4, stride=2, padding=1),
            nn.LeakyReLU(),
            nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1),
            nn.LeakyReLU(),
            nn.Flatten(),
            nn.Linear(2 * ch * (h // 4) * (w // 4), self.hidden_dim),
            nn.LeakyReLU(),
        )

    def decoder(self, latent_dim: int, shape: tuple[int, ...], num_params: int) -> nn.Module:
        """z (B, latent_dim) -> params (B, C, H, W, num_params)."""
        c, h, w = self._check(shape)
        ch = self.channels
        return nn.Sequential(
            nn.Linear(latent_dim, self.hidden_dim),
            nn.LeakyReLU(),
            nn.Linear(self.hidden_dim, 2 * ch * (h // 4) * (w // 4)),
            nn.LeakyReLU(),
            Reshape(2 * ch, h // 4, w // 4),
            nn.ConvTranspose2d(2 * ch, ch, 4, stride=2, padding=1),
            nn.LeakyReLU(),
            nn.ConvTranspose2d(ch, c * num_params, 4, stride=2, padding=1),
            ChannelsLast(c, num_params),
        )
