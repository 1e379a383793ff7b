"""Residual convolutional encoder and decoder (`net=resnet`) for real images (CIFAR, CelebA).

Pre-activation residual blocks (He et al., 2016, "Identity mappings in deep residual
networks"), SiLU activations, stride-2 convolutions down and nearest-neighbour upsampling
plus a 3x3 convolution up; the same interface as `vaekit.nets.ConvNets`:

encoder(shape)                      : x (B, C, H, W) -> h (B, hidden_dim)
decoder(latent_dim, shape, params)  : z (B, L) -> params (B, C, H, W, num_params)
bn_encoder / bn_decoder             : the same, with BatchNorm in the flat layers (hierarchical models)
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from vaekit.errors import VaekitError
from vaekit.nets import ChannelsLast, Reshape, VectorNets, bn_mlp, mlp

NORMS = ("batch", "group", "none")
MAX_GROUPS = 8  # GroupNorm groups: the largest divisor of the width up to this many


def norm_layer(norm: str, channels: int) -> nn.Module:
    """Normalisation over (B, channels, H, W) by name: BatchNorm2d, GroupNorm or Identity."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(channels, MAX_GROUPS), channels)
    return nn.Identity()


def conv3x3(n_in: int, n_out: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1: (B, n_in, H, W) -> (B, n_out, H / stride, W / stride)."""
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1)


class ResidualBlock(nn.Module):
    """x + residual(x), residual = conv3x3(act(norm(conv3x3(act(norm(x)))))): (B, ch, H, W) -> same.

    Pre-activation (He et al., 2016): the skip path is the identity, so a block whose last
    convolution is zero returns its input exactly.
    """

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            norm_layer(norm, channels),
            nn.SiLU(),
            conv3x3(channels, channels),
            norm_layer(norm, channels),
            nn.SiLU(),
            conv3x3(channels, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.residual(x)


class Upsample(nn.Sequential):
    """Nearest-neighbour x2 upsampling, then a 3x3 conv: (B, n_in, H, W) -> (B, n_out, 2H, 2W)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(nn.Upsample(scale_factor=2.0, mode="nearest"), conv3x3(n_in, n_out))


class ResNets(VectorNets):
    """Residual conv nets: `stages` stride-2 stages (H and W divisible by 2**stages), each of
    `blocks_per_stage` residual blocks; stage i has `channels * 2**i` channels (doubling per
    stage), so the default (32, 2 stages) ends at 64 channels on (H/4, W/4) like net=conv.

    The encoder is a 3x3 stem, then per stage a stride-2 conv and the blocks, then norm, SiLU,
    flatten and a linear layer to `hidden_dim`; the decoder mirrors it (linear layers, blocks,
    upsample + conv) and ends in a 3x3 conv to C * num_params channels. `norm` is "group"
    (default: no dependence on the batch, so train and eval behave alike, also for the k * B
    batches of the importance-weighted bound), "batch" (eval uses running statistics) or "none".
    """

    def __init__(
        self,
        channels: int = 32,
        stages: int = 2,
        blocks_per_stage: int = 2,
        norm: str = "group",
        hidden_dim: int = 256,
    ) -> None:
        if min(channels, stages, blocks_per_stage, hidden_dim) < 1:
            raise VaekitError(
                "net.channels, net.stages, net.blocks_per_stage and net.hidden_dim must be at least 1."
            )
        if norm not in NORMS:
            raise VaekitError(f"net.norm must be one of {', '.join(NORMS)}, not {norm!r}.")
        self.channels = channels
        self.stages = stages
        self.blocks_per_stage = blocks_per_stage
        self.norm = norm
        self.hidden_dim = hidden_dim

    def width(self, stage: int) -> int:
        """Channels of stage `stage` (0-based): channels * 2**stage."""
        return self.channels * 2**stage

    def _check(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(C, H, W) of an image shape whose H and W are divisible by 2**stages; else one sentence."""
        factor = 2**self.stages
        if len(shape) != 3 or shape[1] % factor or shape[2] % factor:
            raise VaekitError(
                f"net=resnet with net.stages={self.stages} needs images whose height and width are "
                f"divisible by 2**{self.stages} = {factor}, not dataset.shape={list(shape)}: "
                f"lower net.stages (or use net=mlp)."
            )
        return shape[0], shape[1], shape[2]

    def _flat_size(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(channels, H', W') of the last stage's feature map for an image shape."""
        _, h, w = self._check(shape)
        factor = 2**self.stages
        return self.width(self.stages - 1), h // factor, w // factor

    def _blocks(self, channels: int) -> list[nn.Module]:
        return [ResidualBlock(channels, self.norm) for _ in range(self.blocks_per_stage)]

    def _down_path(self, shape: tuple[int, ...]) -> nn.Sequential:
        """x (B, C, H, W) -> activated features (B, width(stages-1) * H' * W'), flattened."""
        c = self._check(shape)[0]
        layers: list[nn.Module] = [conv3x3(c, self.channels)]
        previous = self.channels
        for stage in range(self.stages):
            layers += [conv3x3(previous, self.width(stage), stride=2), *self._blocks(self.width(stage))]
            previous = self.width(stage)
        layers += [norm_layer(self.norm, previous), nn.SiLU(), nn.Flatten()]
        return nn.Sequential(*layers)

    def _up_path(self, shape: tuple[int, ...], num_params: int) -> nn.Sequential:
        """Features (B, width(stages-1) * H' * W') -> params (B, C, H, W, num_params)."""
        c = self._check(shape)[0]
        layers: list[nn.Module] = [Reshape(*self._flat_size(shape))]
        for stage in reversed(range(self.stages)):
            below = self.width(stage - 1) if stage > 0 else self.channels
            layers += [*self._blocks(self.width(stage)), Upsample(self.width(stage), below)]
        layers += [norm_layer(self.norm, self.channels), nn.SiLU(), conv3x3(self.channels, c * num_params)]
        return nn.Sequential(*layers, ChannelsLast(c, num_params))

    def encoder(self, shape: tuple[int, ...]) -> nn.Module:
        """x (B, C, H, W) -> h (B, hidden_dim)."""
        flat = math.prod(self._flat_size(shape))
        return nn.Sequential(self._down_path(shape), mlp([flat, self.hidden_dim], final_activation=True))

    def decoder(self, latent_dim: int, shape: tuple[int, ...], num_params: int) -> nn.Module:
        """z (B, latent_dim) -> params (B, C, H, W, num_params)."""
        sizes = [latent_dim, self.hidden_dim, math.prod(self._flat_size(shape))]
        return nn.Sequential(mlp(sizes, final_activation=False), self._up_path(shape, num_params))

    # Parts for the hierarchical models (see vaekit.nets.MLPNets): the convolutional path keeps
    # `norm`; the flat layers get BatchNorm, as in ConvNets' bn_ parts.

    def bn_encoder(self, shape: tuple[int, ...]) -> nn.Module:
        """Like `encoder`, with BatchNorm in the flat layer: x (B, C, H, W) -> h (B, hidden_dim)."""
        flat = math.prod(self._flat_size(shape))
        return nn.Sequential(self._down_path(shape), bn_mlp([flat, self.hidden_dim], final_activation=True))

    def bn_decoder(self, latent_dim: int, shape: tuple[int, ...], num_params: int) -> nn.Module:
        """Like `decoder`, with BatchNorm in the flat layers: z (B, L) -> (B, C, H, W, num_params)."""
        sizes = [latent_dim, self.hidden_dim, math.prod(self._flat_size(shape))]
        return nn.Sequential(bn_mlp(sizes, final_activation=False), self._up_path(shape, num_params))
