"""`vaekit sample --sampler langevin`: Langevin dynamics (`vaekit.evaluation.samplers.langevin`)
as the sampler of a figure.

- model=rbm with Gaussian visible units: chains on the free energy F(v) of the visible units,
  started at the base model N(b, sigma^2), instead of block Gibbs steps.
- a one-level VAE, `--from INDEX`: chains on the latent posterior of one test image x,
  p(z|x) ∝ p(x|z) p(z), i.e. the energy E(z) = -log p(x|z) - log p(z), started at the mean of
  q(z|x) ("Langevin instead of Gibbs"); the figure is x followed by the decoded chains.
- model=ebm: chains on its energy E(y) with its training sampler's settings (step size, noise,
  clipping, clamping to [0, 1]; `--mala`: the exact sampler), started at uniform noise or, with
  `--init buffer`, at its replay buffer's states.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vaekit.errors import VaekitError
from vaekit.evaluation.samplers import check_langevin_target, langevin
from vaekit.latents import mean_of, require_one_level

DEFAULT_STEPS = 500
DEFAULT_STEP_SIZE = 0.01


class PosteriorEnergy:
    """E(z) = -log p(x|z) - log p(z) of one image x (1, C, H, W), for z (B, L): (B,)."""

    def __init__(self, model: nn.Module, x: Tensor) -> None:
        self.model = model
        self.x = x

    def __call__(self, z: Tensor) -> Tensor:
        log_p_x = self.model.p_x(z).log_prob(self.x.expand(z.shape[0], *self.x.shape[1:]))
        return -log_p_x - self.model.prior().log_prob(z)


def rbm_langevin_images(model: Any, n: int, steps: int, step_size: float, mala: bool) -> Tensor:
    """n images (n, C, H, W) from Langevin chains on a Gaussian-visible RBM's free energy;
    a Bernoulli-visible one is refused in one sentence."""
    check_langevin_target(model.rbm)
    h = model.rbm.weight.new_zeros(n, model.rbm.hidden)
    v0 = model.rbm.sample_visible(h, 0.0, model.base_bias)  # the base model N(b_A, sigma^2)
    result = langevin(model.rbm.free_energy, v0, steps, step_size, mala=mala)
    return model.images(result.x)


def posterior_langevin_images(
    model: nn.Module, x: Tensor, n: int, steps: int, step_size: float, mala: bool
) -> Tensor:
    """x (1, C, H, W) followed by the decodings (means of p(x|z)) of n Langevin chains on its
    latent posterior p(z|x), each started at the mean of q(z|x): (n + 1, C, H, W)."""
    require_one_level(model, "--sampler langevin --from")
    if getattr(model, "conditional", False):
        raise VaekitError("--sampler langevin --from samples an unconditional VAE's posterior, not a CVAE's.")
    with torch.no_grad():
        z0 = mean_of(model.q_z(x)).expand(n, -1)
    result = langevin(PosteriorEnergy(model, x), z0, steps, step_size, mala=mala)
    with torch.no_grad():
        decoded = model.p_x(result.x).mean
    return torch.cat([x, decoded])


INITS = ("noise", "buffer")


def ebm_langevin_images(
    model: Any, n: int, steps: int, step_size: float | None, mala: bool, init: str | None
) -> Tensor:
    """n images (n, C, H, W) from Langevin chains on a model=ebm's energy: `steps` steps of its
    training sampler (`step_size`, if given, replaces its sgld_step_size; `mala`: exact MALA),
    started at uniform noise (`init` None or "noise") or at n random replay-buffer states ("buffer")."""
    if init == "buffer":
        y0 = model.replay[torch.randperm(model.replay.shape[0], device=model.replay.device)[:n]]
    else:
        y0 = model.noise(n)
    return model.langevin(y0, steps, step_size, mala).x


def check_langevin_options(
    model: nn.Module, source: int | None, steps: int | None, step_size: float | None, init: str | None = None
) -> None:
    """One sentence for options that do not fit the model: a VAE needs --from INDEX, an RBM and an
    EBM none; --init is an EBM's."""
    trained_by = getattr(model, "trained_by", None)
    if init is not None and init not in INITS:
        raise VaekitError(f"--init must be one of {', '.join(INITS)}, not {init}.")
    if init is not None and trained_by != "contrastive":
        raise VaekitError(
            f"--init {init} chooses where a model=ebm's chains start (noise or its replay buffer), and "
            f"this run is not model=ebm: drop --init."
        )
    if trained_by == "contrastive":
        if source is not None:
            raise VaekitError("--from samples a VAE's latent posterior: model=ebm samples its energy.")
    elif trained_by == "cd":
        if source is not None:
            raise VaekitError("--from samples a VAE's latent posterior: model=rbm samples its visible units.")
    elif source is None:
        raise VaekitError(
            "a VAE's prior samples need no Markov chain: --sampler langevin samples the latent "
            "posterior of one test image, add --from INDEX."
        )
    if steps is not None and steps < 1:
        raise VaekitError(f"--steps must be at least 1 Langevin step, not {steps}.")
    if step_size is not None and not step_size > 0:  # None: an EBM's own sgld_step_size
        raise VaekitError(f"--step-size must be positive, not {step_size}.")
