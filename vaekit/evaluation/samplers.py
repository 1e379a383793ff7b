"""MCMC samplers: block Gibbs chains of an RBM, and (Metropolis-adjusted) Langevin dynamics for
any differentiable energy E(x) (a Gaussian RBM's free energy, a deep EBM, a VAE's latent
posterior -log p(x, z) as a function of z)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vaekit.errors import VaekitError
from vaekit.rbm import RBM


@torch.no_grad()
def gibbs_chain(rbm: RBM, v0: Tensor, steps: int) -> Tensor:
    """`steps` block Gibbs steps v -> h ~ p(h|v) -> v ~ p(v|h) from v0 (B, D or *shape),
    one chain per row: returns v in v0's shape."""
    v = rbm.flatten_visible(v0)
    for _ in range(steps):
        v = rbm.gibbs_step(v)
    return v.reshape(v0.shape)


def check_langevin_target(rbm: RBM) -> None:
    """Refuse, in one sentence, an RBM whose visible units are discrete (no gradient to follow)."""
    if not rbm.continuous_visible:
        raise VaekitError(
            f"Langevin sampling needs continuous visible units, and this {type(rbm).__name__}'s are "
            f"binary (likelihood=bernoulli): sample it with Gibbs steps (the default sampler)."
        )


@dataclass(frozen=True)
class LangevinResult:
    """Final states (x0's shape), MH acceptance rate over all steps and chains (None for ULA),
    and the mean per-example norm of grad E (before clipping) at the last step."""

    x: Tensor
    accept_rate: float | None
    grad_norm: float


def _energy_and_grad(energy: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """E(x) (B,) and grad_x E(x) (B, ...), both detached; only x's gradient is computed, so no
    parameter of the energy collects a .grad."""
    x = x.detach().requires_grad_(True)
    e = energy(x)
    if e.shape != x.shape[:1]:
        raise VaekitError(
            f"a Langevin energy must map a batch of {x.shape[0]} states to {x.shape[0]} energies, "
            f"not to shape {tuple(e.shape)}."
        )
    (grad,) = torch.autograd.grad(e.sum(), x)
    return e.detach(), grad


def _per_example_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)  # (B,)


def _clip(grad: Tensor, grad_clip: float | None) -> Tensor:
    """Scale each example's gradient to norm at most grad_clip."""
    if grad_clip is None:
        return grad
    scale = (grad_clip / _per_example_norm(grad).clamp(min=1e-12)).clamp(max=1.0)
    return grad * scale.view(-1, *([1] * (grad.dim() - 1)))


def _log_proposal(x_to: Tensor, x_from: Tensor, drift_from: Tensor, step_size: float) -> Tensor:
    """log N(x_to; x_from - (eta / 2) drift_from, eta I) up to a constant shared by both directions: (B,)."""
    return -(x_to - x_from + 0.5 * step_size * drift_from).flatten(1).square().sum(1) / (2.0 * step_size)


def langevin(
    energy: Callable[[Tensor], Tensor],
    x0: Tensor,
    steps: int,
    step_size: float,
    noise_scale: float = 1.0,
    grad_clip: float | None = None,
    clamp: tuple[float, float] | None = None,
    mala: bool = False,
) -> LangevinResult:
    """Langevin dynamics on exp(-E): x0 (B, ...) -> B independent chains, `energy` maps (B, ...) to (B,).

    Unadjusted (ULA): x <- x - (eta / 2) grad E(x) + noise_scale sqrt(eta) w, w ~ N(0, I), then
    x is clamped to `clamp` = (lo, hi) if given. It targets exp(-E) only as eta -> 0 with
    noise_scale = 1; noise_scale < 1 is the usual SGLD shortcut for EBM negatives.
    With `mala` (Roberts & Tweedie, 1996) each proposal is accepted with probability
    min(1, exp(E(x) - E(x')) q(x | x') / q(x' | x)), so the chain targets exp(-E) exactly at any
    step size; with `clamp` a proposal outside the box is rejected (so the target is exp(-E)
    restricted to it). `grad_clip` caps each example's gradient norm in the drift (in both
    proposal directions with `mala`, which keeps the correction exact).

    Gradients come from torch.autograd.grad with respect to x only, under enable_grad (and
    outside inference mode), so it works inside a caller's no_grad and leaves no .grad on the
    energy's parameters. Randomness from torch's global RNG.
    """
    if steps < 1:
        raise VaekitError(f"Langevin sampling needs at least one step, not {steps}.")
    if step_size <= 0:
        raise VaekitError(f"the Langevin step size must be positive, not {step_size}.")
    if mala and noise_scale != 1.0:
        raise VaekitError(
            f"MALA's correction targets exp(-E) only with noise_scale=1, not {noise_scale}: "
            "drop the noise scale or turn mala off."
        )
    noise_std = noise_scale * math.sqrt(step_size)
    with torch.inference_mode(False), torch.enable_grad():
        x = x0.detach().clone()
        if clamp is not None:
            x = x.clamp(*clamp)
        accepted = x.new_zeros(x.shape[0])  # per chain, on the device: no host sync per step
        e, grad = _energy_and_grad(energy, x)
        for step in range(steps):
            last = step == steps - 1
            if last:
                grad_norm = _per_example_norm(grad).mean().item()
            drift = _clip(grad, grad_clip)
            proposal = x - 0.5 * step_size * drift + noise_std * torch.randn_like(x)
            if not mala:
                x = proposal if clamp is None else proposal.clamp(*clamp)
                if not last:  # the last state's gradient would go unused
                    e, grad = _energy_and_grad(energy, x)
                continue
            e_new, grad_new = _energy_and_grad(energy, proposal)
            drift_new = _clip(grad_new, grad_clip)
            log_alpha = (e - e_new + _log_proposal(x, proposal, drift_new, step_size)
                         - _log_proposal(proposal, x, drift, step_size))
            accept = torch.rand_like(log_alpha).log() < log_alpha  # (B,)
            if clamp is not None:
                accept &= ((proposal >= clamp[0]) & (proposal <= clamp[1])).flatten(1).all(1)
            accepted += accept
            keep = accept.view(-1, *([1] * (x.dim() - 1)))
            x = torch.where(keep, proposal, x)
            e = torch.where(accept, e_new, e)
            grad = torch.where(keep, grad_new, grad)
    accept_rate = accepted.mean().item() / steps if mala else None
    return LangevinResult(x=x.detach(), accept_rate=accept_rate, grad_norm=grad_norm)
