"""Encoder and decoder networks. A net option is a small factory that knows the data shape.

encoder(shape)                      : x (B, *shape) -> h (B, out_dim)
decoder(latent_dim, shape, params)  : z (B, L) -> params (B, *shape, num_params)
"""

from __future__ import annotations

import math

import torch.nn.functional as F
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


class BatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d that normalises a one-example training batch with its running statistics
    (batch statistics of one example are undefined; the trainer's last batch can be that small)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] == 1:
            stats = (self.running_mean, self.running_var)
            return F.batch_norm(x, *stats, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def bn_mlp(sizes: list[int], final_activation: bool) -> nn.Sequential:
    """Like `mlp`, with BatchNorm (Ioffe & Szegedy, 2015) before every hidden activation."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if final_activation or i < len(sizes) - 2:
            layers += [BatchNorm1d(n_out), nn.LeakyReLU()]
    return nn.Sequential(*layers)


class VectorNets:
    """What every net option offers for flat vectors (the latents are vectors even when x is
    an image); a subclass sets `hidden_dim`."""

    hidden_dim: int

    def bn_vector_net(self, in_dim: int, out_dim: int | None = None) -> nn.Module:
        """Small net on flat vectors (latent-to-latent maps, heads, residual branches): one
        hidden layer of `hidden_dim` with BatchNorm; (B, in_dim) -> (B, out_dim), or the
        activated hidden layer (B, hidden_dim) when out_dim is None."""
        return bn_mlp([in_dim, self.hidden_dim] + ([] if out_dim is None else [out_dim]), out_dim is None)


class MLPNets(VectorNets):
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

    # Parts with BatchNorm, for the hierarchical models (vaekit.hierarchical): with several
    # levels of Gaussians, normalised features keep the top levels in use and train faster.

    def bn_encoder(self, shape: tuple[int, ...]) -> nn.Module:
        """Like `encoder`, with BatchNorm in every hidden layer: x (B, *shape) -> h (B, hidden_dim)."""
        sizes = [math.prod(shape)] + [self.hidden_dim] * self.num_layers
        return nn.Sequential(nn.Flatten(), bn_mlp(sizes, final_activation=True))

    def bn_decoder(self, latent_dim: int, shape: tuple[int, ...], num_params: int) -> nn.Module:
        """Like `decoder`, with BatchNorm in every hidden layer: z (B, L) -> (B, *shape, num_params)."""
        sizes = [latent_dim] + [self.hidden_dim] * self.num_layers + [math.prod(shape) * num_params]
        return nn.Sequential(bn_mlp(sizes, final_activation=False), Reshape(*shape, num_params))


class ConvNets(VectorNets):
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

    # Parts with BatchNorm, for the hierarchical models (see MLPNets).

    def bn_encoder(self, shape: tuple[int, ...]) -> nn.Module:
        """Like `encoder`, with BatchNorm after every hidden layer: x (B, C, H, W) -> h (B, hidden_dim)."""
        c, h, w = self._check(shape)
        ch = self.channels
        return nn.Sequential(
            nn.Conv2d(c, ch, 4, stride=2, padding=1),
            nn.BatchNorm2d(ch),
            nn.LeakyReLU(),
            nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1),
            nn.BatchNorm2d(2 * ch),
            nn.LeakyReLU(),
            nn.Flatten(),
            bn_mlp([2 * ch * (h // 4) * (w // 4), self.hidden_dim], final_activation=True),
        )

    def bn_decoder(self, latent_dim: int, shape: tuple[int, ...], num_params: int) -> nn.Module:
        """Like `decoder`, with BatchNorm after every hidden layer: z (B, L) -> (B, C, H, W, num_params)."""
        c, h, w = self._check(shape)
        ch = self.channels
        return nn.Sequential(
            bn_mlp([latent_dim, self.hidden_dim, 2 * ch * (h // 4) * (w // 4)], final_activation=True),
            Reshape(2 * ch, h // 4, w // 4),
            nn.ConvTranspose2d(2 * ch, ch, 4, stride=2, padding=1),
            nn.BatchNorm2d(ch),
            nn.LeakyReLU(),
            nn.ConvTranspose2d(ch, c * num_params, 4, stride=2, padding=1),
            ChannelsLast(c, num_params),
        )
