"""model=ebm: a deep energy-based model p(y) = exp(-E(y)) / Z on dequantized images, trained with
Langevin (SGLD) negatives from a replay buffer (Du & Mordatch, 2019, "Implicit generation and
generalization in energy-based models").

The energy is a scalar head on the `net` group's encoder features, E(y) = w . h(y) + b (optional
spectral normalization of every linear and convolutional layer, Miyato et al., 2018). With L levels
and x_int the integer pixel value the data are dequantized, y = (x_int + u) / L, u ~ U[0, 1)^D, so

    -log P(x_int) <= E_u[E(y)] + log Z + D log L        (Theis et al., 2016),

the bound `vaekit.evaluation.ais.ebm_estimates` reports with log Z by AIS. A binary dataset's default
likelihood (MNIST's bernoulli) does not apply: the EBM models the data's levels (MNIST's 256) like any
other, or, with `binarize`, the images binarized as the Bernoulli VAEs and RBMs see them (x ~
Bernoulli(intensity) afresh each epoch, a fixed draw for evaluation) with L = 2, so that its NLL is
comparable with theirs.

Negatives: `sgld_steps` steps of `vaekit.evaluation.samplers.langevin`,

    y <- clamp(y - (eta / 2) grad E(y) + sgld_noise w, 0, 1),   w ~ N(0, I), eta = sgld_step_size,

(sgld_noise = sqrt(eta) by default: Langevin dynamics proper; Du & Mordatch's colder sampler is
eta = 20, sgld_noise = 0.005)

from `replay` (buffer_size, *shape), a buffer of past negatives saved in the state_dict, with a
fraction `reinit_prob` of each batch's chains restarted from uniform noise; the chains' final states
go back into the buffer. `vaekit.objectives.ContrastiveEnergy` turns them into the loss.

The class serves any energy network and any example shape: `energy_net` (B, *shape) -> (B,) replaces
the net group's, `num_levels=None` means real-valued data (no dequantization), and `data_range`
bounds the noise and the chains (e.g. 2-D points in a box).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as add_spectral_norm

from vaekit.errors import VaekitError
from vaekit.evaluation.samplers import LangevinResult, langevin
from vaekit.image_rbm import training_statistics


class DequantizedLevels:
    """What model=ebm offers in place of a likelihood: the NLL is of the discrete data (a code
    length), of their own integer levels or, with `binary_data`, of the binarized images
    (`vaekit.build.device_data` binarizes them as it does for Bernoulli likelihoods)."""

    discrete = True

    def __init__(self, binary_data: bool = False) -> None:
        self.binary_data = binary_data


class ScalarHead(nn.Module):
    """E(x) = head(features(x)): (B, *shape) -> (B,)."""

    def __init__(self, features: nn.Module, hidden_dim: int) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Linear(hidden_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)).squeeze(-1)


class EnergyModel(nn.Module):
    """A deep EBM over examples of `data_shape`: `energy_net` gives E (B, *shape) -> (B,), `replay`
    (buffer_size, *shape) holds the SGLD chains.

    `net`: the net group's factory (its `encoder(shape)` and `hidden_dim`), used unless `energy_net`
    is given. `num_levels`: the data's levels (None: real-valued data). `train`: the training split
    ((N, *shape) uint8 with levels, floats without), whose per-dimension mean and standard deviation
    (`data_mean`, `data_std`, buffers; None: placeholders for a checkpoint to fill) fit AIS's base.
    `latent_dim` is accepted for the config groups that read it and must equal net.hidden_dim.
    `binarize`: model the images binarized (x ~ Bernoulli(x_int / (L - 1))) with 2 levels.
    `log_z` (a buffer, nan until estimated) is the latest AIS estimate of log Z.
    """

    trained_by = "contrastive"  # the contrastive EBM loss, not an ELBO: vaekit.objectives.objective_for

    def __init__(
        self,
        data_shape: tuple[int, ...],
        num_levels: int | None,
        net: Any = None,
        train: Tensor | None = None,
        energy_net: nn.Module | None = None,
        sgld_steps: int = 40,
        sgld_step_size: float = 0.01,
        sgld_noise: float | None = None,
        sgld_grad_clip: float | None = None,
        buffer_size: int = 10000,
        reinit_prob: float = 0.05,
        alpha: float = 0.01,
        spectral_norm: bool = False,
        sample_steps: int = 100,
        data_range: tuple[float, float] = (0.0, 1.0),
        latent_dim: int | None = None,
        binarize: bool = False,
    ) -> None:
        super().__init__()
        if binarize and num_levels is None:
            raise VaekitError("model.binarize=true needs images with intensity levels, not real-valued data.")
        check_sampler_settings(sgld_steps, buffer_size, reinit_prob)
        rules = [
            (sgld_step_size > 0, f"model.sgld_step_size must be positive, not {sgld_step_size}."),
            (sgld_noise is None or sgld_noise >= 0,
             f"model.sgld_noise must be 0 or more (or null: sqrt(eta)), not {sgld_noise}."),
            (sgld_grad_clip is None or sgld_grad_clip > 0,
             f"model.sgld_grad_clip must be positive (or null: off), not {sgld_grad_clip}."),
            (alpha >= 0, f"model.alpha must be 0 or more, not {alpha}."),
            (sample_steps >= 1, f"model.sample_steps must be at least 1 Langevin step, not {sample_steps}."),
            (data_range[0] < data_range[1], f"model.data_range must be (low, high), not {list(data_range)}."),
        ]  # fmt: skip
        for ok, message in rules:
            if not ok:
                raise VaekitError(message)
        if energy_net is None:
            if net is None:
                raise VaekitError("model=ebm needs a net group (net=mlp, conv or resnet) for its energy.")
            if latent_dim is not None and latent_dim != net.hidden_dim:
                raise VaekitError(
                    f"model=ebm has no latent code; its feature size is net.hidden_dim: drop "
                    f"model.latent_dim={latent_dim}, or set net.hidden_dim={latent_dim}."
                )
            energy_net = ScalarHead(net.encoder(tuple(data_shape)), net.hidden_dim)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in energy_net.modules()):
            raise VaekitError(
                "model=ebm needs an energy without batch statistics (its Langevin chains would change "
                "them): use net.norm=group or none."
            )
        if spectral_norm:
            for module in list(energy_net.modules()):
                if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                    add_spectral_norm(module)
        self.energy_net = energy_net
        self.data_shape = tuple(data_shape)
        self.num_levels = 2 if binarize else num_levels
        self.likelihood = DequantizedLevels(binary_data=binarize)
        self.sgld_steps = sgld_steps
        self.sgld_step_size = float(sgld_step_size)
        # null: sqrt(eta), Langevin dynamics proper; less is the usual colder SGLD of EBM training
        self.sgld_noise = math.sqrt(sgld_step_size) if sgld_noise is None else float(sgld_noise)
        self.sgld_grad_clip = sgld_grad_clip
        self.buffer_size = buffer_size
        self.reinit_prob = float(reinit_prob)
        self.alpha = float(alpha)
        self.sample_steps = sample_steps
        self.data_range = (float(data_range[0]), float(data_range[1]))
        mean, std = data_statistics(train, self.data_shape, num_levels, binarize)
        self.register_buffer("data_mean", mean)  # (*shape): AIS's base, fitted to the training split
        self.register_buffer("data_std", std)
        self.register_buffer("log_z", torch.tensor(math.nan))
        self.register_buffer("replay", self.noise(buffer_size, device=mean.device))

    @property
    def num_dims(self) -> int:
        """D, the number of values per example."""
        return math.prod(self.data_shape)

    def forward(self, y: Tensor) -> Tensor:
        """E(y) of dequantized examples y (B, *shape): (B,)."""
        return self.energy_net(y)

    def energy(self, y: Tensor) -> Tensor:
        """E(y), (B, *shape) -> (B,); the same as calling the model."""
        return self.energy_net(y)

    def noise(self, n: int, device: torch.device | None = None) -> Tensor:
        """n uniform draws on the data range, (n, *shape): where chains start afresh."""
        low, high = self.data_range
        device = device if device is not None else self.replay.device
        return low + (high - low) * torch.rand(n, *self.data_shape, device=device)

    def levels_of(self, x: Tensor) -> Tensor:
        """Images x in [0, 1] (data as the trainer feeds them, x_int / (L - 1)) -> x_int."""
        return torch.round(x * (self.num_levels - 1))

    def dequantize(self, x: Tensor) -> Tensor:
        """y = (x_int + u) / L with a fresh u ~ U[0, 1) per value (global RNG); real-valued data
        (num_levels None) are returned as they are: (B, *shape) -> (B, *shape)."""
        if self.num_levels is None:
            return x
        return (self.levels_of(x) + torch.rand_like(x)) / self.num_levels

    def midpoints(self, x: Tensor) -> Tensor:
        """y = (x_int + 1/2) / L, each value's bin centre (no noise)."""
        if self.num_levels is None:
            return x
        return (self.levels_of(x) + 0.5) / self.num_levels

    @property
    def nll_offset(self) -> float:
        """D log L, the dequantization bound's term (0 for real-valued data)."""
        return 0.0 if self.num_levels is None else self.num_dims * math.log(self.num_levels)

    def langevin(
        self, y0: Tensor, steps: int, step_size: float | None = None, mala: bool = False
    ) -> LangevinResult:
        """`steps` steps of the training sampler (step size, noise, clipping, clamping to the data
        range) from y0 (B, *shape); `step_size` replaces sgld_step_size (keeping sgld_noise), and
        `mala` gives the exact sampler of exp(-E) on the data range (noise_scale 1)."""
        eta = self.sgld_step_size if step_size is None else step_size
        noise_scale = 1.0 if mala else self.sgld_noise / math.sqrt(eta)
        clip, box = self.sgld_grad_clip, self.data_range
        return langevin(self.energy_net, y0, steps, eta, noise_scale, clip, box, mala)

    def negatives(self, n: int) -> LangevinResult:
        """n negatives for a training step: n distinct replay slots, each restarted from noise with
        probability reinit_prob, advanced `sgld_steps` steps and written back (global RNG)."""
        if n > self.buffer_size:
            raise VaekitError(f"model.buffer_size={self.buffer_size} is smaller than a batch of {n}.")
        slots = torch.randperm(self.buffer_size, device=self.replay.device)[:n]
        restart = torch.rand(n, device=self.replay.device) < self.reinit_prob
        y0 = torch.where(restart.view(-1, *[1] * len(self.data_shape)), self.noise(n), self.replay[slots])
        result = self.langevin(y0, self.sgld_steps)
        with torch.no_grad():
            self.replay[slots] = result.x
        return result

    @torch.no_grad()
    def sample(self, n: int, draw: bool = False) -> Tensor:
        """n fresh chains: uniform noise, then `sample_steps` steps of the training sampler,
        (n, *shape) (`draw` is accepted for the loggers' interface: the chains are draws already)."""
        return self.langevin(self.noise(n), self.sample_steps).x

    @torch.no_grad()
    def buffer_samples(self, n: int) -> Tensor:
        """The first n replay-buffer states, (n, *shape): what training's negatives look like."""
        return self.replay[:n].clone()

    @torch.no_grad()
    def reconstruct(self, x: Tensor, draw: bool = False) -> Tensor:
        """An EBM has no code to reconstruct from: x's bin centres after `sgld_steps` steps of the
        training sampler, (B, *shape), which shows whether the data sit in the model's basins."""
        return self.langevin(self.midpoints(x), self.sgld_steps).x

    @torch.no_grad()
    def posterior_means(self, x: Tensor) -> dict[str, Tensor]:
        """{}: an EBM has no latent variables (no Projector embedding, no active units)."""
        return {}

    @torch.no_grad()
    def nll_per_example(self, x: Tensor) -> Tensor:
        """A per-example NLL (B,) of images x (B, C, H, W) in [0, 1] for ranking (OOD scores):
        E(y) at the bin centres y = (x_int + 1/2) / L plus D log L, plus log Z when the model holds
        an AIS estimate (`log_z`, else 0: an unnormalized NLL, which ranks alike)."""
        log_z = float(self.log_z) if torch.isfinite(self.log_z) else 0.0
        return self.energy_net(self.midpoints(x)) + self.nll_offset + log_z


def check_sampler_settings(sgld_steps: int, buffer_size: int, reinit_prob: float,
                           batch_size: int | None = None) -> None:
    """One sentence for the first bad sampler setting: sgld_steps < 1, a buffer smaller than one
    batch (or than one example), reinit_prob outside [0, 1]."""
    if sgld_steps < 1:
        raise VaekitError(f"model.sgld_steps must be at least 1 Langevin step, not {sgld_steps}.")
    least = max(batch_size or 1, 1)
    if buffer_size < least:
        what = f"a batch (trainer.batch_size={batch_size})" if batch_size else "one example"
        raise VaekitError(f"model.buffer_size={buffer_size} is smaller than {what}: the negatives of a "
                          f"step come from distinct buffer slots.")  # fmt: skip
    if not 0.0 <= reinit_prob <= 1.0:
        raise VaekitError(f"model.reinit_prob must be a probability in [0, 1], not {reinit_prob}.")


def data_statistics(
    train: Tensor | None, shape: tuple[int, ...], num_levels: int | None, binarize: bool = False
) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation (*shape) of each value of the training split: of the dequantized
    y = (x_int + u) / L for images with levels (`vaekit.image_rbm.training_statistics`), of
    y = (b + u) / 2 with b ~ Bernoulli(x_int / (L - 1)) for binarized ones, of the values themselves
    otherwise (floored at 1e-3); 0 and 1 without a split."""
    if train is None:
        return torch.zeros(shape), torch.ones(shape)
    if binarize:  # b's marginal over the split is Bernoulli(p), p the mean intensity; u adds 1/12
        p = train.reshape(train.shape[0], -1).double().mean(0) / (num_levels - 1)
        variance = p * (1 - p) / 4 + 1.0 / 48
        return ((p + 0.5) / 2).float().view(shape), variance.sqrt().float().view(shape)
    if num_levels is not None:
        mean, std, _ = training_statistics(train, num_levels)
        return mean.view(shape), std.view(shape)
    flat = train.reshape(train.shape[0], -1).double()
    return flat.mean(0).float().view(shape), flat.std(0).clamp(min=1e-3).float().view(shape)
