"""model=rbm: a restricted Boltzmann machine (`vaekit.rbm`) on image batches, with the model
interface the trainer, the loggers and the commands use (samples, reconstructions, features).

Binary data (likelihood=bernoulli: MNIST, Omniglot, dynamically binarized as for every model)
gets Bernoulli visible units, v = x. Other data gets Gaussian visible units on dequantized,
standardized pixels: with L levels and x_int the integer value,

    y = (x_int + u) / L, u ~ U[0, 1)^D,     v = (y - m) / s     (m, s: the training split's),

so the test NLL of the discrete data is bounded by the density of v (Theis et al., 2016):

    -log P(x_int) <= E_u[-log p(v)] + sum_i log s_i + D log L = E_u[F(v)] + log Z + `nll_offset`.

Contrastive divergence (CD-k or persistent CD, `vaekit.objectives.ContrastiveDivergence`) trains
it; AIS (`vaekit.evaluation.ais`) gives its log Z and test NLL.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from vaekit.errors import VaekitError
from vaekit.rbm import RBM, BernoulliRBM, GaussianBernoulliRBM

BASE_RATE_EPS = 1e-3  # keeps the base-rate model's biases finite for pixels that are never on


class ImageRBM(nn.Module):
    """An RBM over images of `data_shape` (C, H, W): `rbm` holds W, b, c (and sigma, chains).

    `likelihood` is the configured likelihood group (its `binary_data` picks the visible units);
    `train` (N, C, H, W) uint8, the training split, sets the standardization (Gaussian units) and
    the base-rate biases of AIS (binary units), both saved as buffers (None: placeholders, for a
    model whose checkpoint is loaded next). `latent_dim` is `hidden` under the name the other
    models' config groups read; it must equal hidden.
    """

    trained_by = "cd"  # contrastive divergence, not an ELBO: vaekit.objectives.objective_for

    def __init__(
        self,
        data_shape: tuple[int, ...],
        likelihood: Any,
        num_levels: int,
        train: Tensor | None,
        hidden: int = 500,
        cd_k: int = 1,
        persistent: bool = False,
        num_chains: int = 100,
        learn_sigma: bool = True,
        sample_steps: int = 200,
        latent_dim: int | None = None,
    ) -> None:
        super().__init__()
        if latent_dim is not None and latent_dim != hidden:
            raise VaekitError(f"model=rbm's latent size is model.hidden: set model.hidden={latent_dim}.")
        if sample_steps < 1:
            raise VaekitError(f"model.sample_steps must be at least 1 Gibbs step, not {sample_steps}.")
        self.data_shape = tuple(data_shape)
        self.likelihood = likelihood
        self.num_levels = num_levels
        self.sample_steps = sample_steps
        self.binary = bool(likelihood.binary_data)
        visible = math.prod(self.data_shape)
        if self.binary:
            self.rbm: RBM = BernoulliRBM(visible, hidden, cd_k, persistent, num_chains)
        else:
            self.rbm = GaussianBernoulliRBM(visible, hidden, cd_k, persistent, num_chains, learn_sigma)
        if train is None:
            train = torch.zeros(2, visible, dtype=torch.uint8)
        mean, std, base = training_statistics(train, num_levels)
        self.register_buffer("data_mean", mean)
        self.register_buffer("data_std", std)
        self.register_buffer("base_bias", base if self.binary else self.rbm.visible_bias.detach().clone())

    def visible_units(self, x: Tensor) -> Tensor:
        """Images x (B, C, H, W) in [0, 1] (binary for Bernoulli units) -> v (B, D); Gaussian
        units get a fresh dequantization u (global RNG) and the standardization."""
        flat = x.reshape(x.shape[0], -1)
        if self.binary:
            return flat
        x_int = torch.round(flat * (self.num_levels - 1))
        y = (x_int + torch.rand_like(flat)) / self.num_levels
        return (y - self.data_mean) / self.data_std

    def images(self, v: Tensor) -> Tensor:
        """Visible values v (B, D) -> images (B, C, H, W) in [0, 1], the inverse of
        `visible_units` up to the dequantization."""
        if not self.binary:
            y = v * self.data_std + self.data_mean  # (B, D) in about [0, 1)
            v = (y * self.num_levels - 0.5).clamp(0, self.num_levels - 1) / (self.num_levels - 1)
        return v.reshape(v.shape[0], *self.data_shape).clamp(0, 1)

    @property
    def nll_offset(self) -> float:
        """sum_i log s_i + D log L for Gaussian units (the dequantized bound), 0 for binary ones."""
        if self.binary:
            return 0.0
        return float(self.data_std.log().sum()) + math.prod(self.data_shape) * math.log(self.num_levels)

    def free_energy(self, x: Tensor) -> Tensor:
        """F(v) of images x (B, C, H, W), (B,): -log p(v) = F(v) + log Z."""
        return self.rbm.free_energy(self.visible_units(x))

    def nll_per_example(self, x: Tensor) -> Tensor:
        """F(v) + `nll_offset` of images x (B, C, H, W), (B,): the per-example NLL bound of the
        module docstring up to its constant log Z (one dequantization draw for Gaussian units),
        the score `vaekit evaluate --ood` ranks examples by."""
        return self.free_energy(x) + self.nll_offset

    @torch.no_grad()
    def sample(self, n: int, draw: bool = False) -> Tensor:
        """n images from `sample_steps` block Gibbs steps started at the base model: the last
        step's mean of p(v|h) (its draw with `draw`), (n, C, H, W) in [0, 1]."""
        h = self.rbm.weight.new_zeros(n, self.rbm.hidden)
        v = self.rbm.sample_visible(h, 0.0, self.base_bias)
        for _ in range(self.sample_steps - 1):
            v = self.rbm.gibbs_step(v)
        h = self.rbm.sample_hidden(v)
        return self.images(self.rbm.sample_visible(h) if draw else self.rbm.visible_mean(h))

    @torch.no_grad()
    def reconstruct(self, x: Tensor, draw: bool = False) -> Tensor:
        """x -> p(h|v) -> the mean of p(v|h) at h's probabilities (a draw via sampled h with
        `draw`): (B, C, H, W) in [0, 1]."""
        h = self.rbm.hidden_probs(self.visible_units(x))
        return self.images(self.rbm.sample_visible(torch.bernoulli(h)) if draw else self.rbm.visible_mean(h))

    @torch.no_grad()
    def posterior_means(self, x: Tensor) -> dict[str, Tensor]:
        """p(h_j = 1 | v) for x (B, C, H, W): {"h": (B, hidden)}, the features the Projector
        shows and the active-units count reads."""
        return {"h": self.rbm.hidden_probs(self.visible_units(x))}


def training_statistics(train: Tensor, num_levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel mean and standard deviation (D,) of the dequantized y = (x_int + u) / L over the
    training split (uint8, (N, *shape)), and the base-rate biases log(p / (1 - p)) of its
    intensities p = mean of x_int / (L - 1) (Salakhutdinov & Murray, 2008)."""
    x = train.reshape(train.shape[0], -1).double()
    mean = (x.mean(0) + 0.5) / num_levels
    variance = x.var(0, correction=0) / num_levels**2 + 1.0 / (12 * num_levels**2)  # + U[0, 1)/L's
    p = (x.mean(0) / (num_levels - 1)).clamp(BASE_RATE_EPS, 1 - BASE_RATE_EPS)
    base = torch.log(p) - torch.log1p(-p)
    return mean.float(), variance.sqrt().float(), base.float()
