"""Annealed importance sampling (Neal, 2001) of an RBM's log partition function, and the test
NLL it gives (Salakhutdinov & Murray, 2008, "On the quantitative analysis of deep belief
networks").

The path runs from a base model A (visible biases b_A, no weights, h uniform) to the RBM B
through the geometric averages on the joint (v, h),

    p_k(v, h) ∝ exp(-(1 - beta_k) E_A(v) - beta_k E_B(v, h)),   beta_k = k / (K - 1), k = 0..K-1,

whose marginals p*_k(v) = exp(-F_{beta_k}(v)) are `rbm.free_energy(v, beta_k, b_A)`. Each chain
starts at v_1 ~ p_A, takes a Gibbs step that leaves p_k invariant after weighting at beta_k, and

    log w = sum_{k=1}^{K-1} [F_{beta_{k-1}}(v_k) - F_{beta_k}(v_k)],   Z_B / Z_A ~= mean_chains w.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vaekit.errors import VaekitError
from vaekit.rbm import RBM


@dataclass(frozen=True)
class AISResult:
    """log Z estimate, its delta-method standard error, and the chains' log-weights (num_chains,)."""

    log_z: float
    stderr: float
    log_weights: Tensor


def base_rate_bias(v_train: Tensor, eps: float = 1e-3) -> Tensor:
    """The base-rate model's visible biases log(p / (1 - p)), p = the mean of each binary visible
    unit over the data clamped to [eps, 1 - eps] (Salakhutdinov & Murray, 2008):
    (N, D or *shape) -> (D,)."""
    p = v_train.reshape(v_train.shape[0], -1).float().mean(0).clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


def log_mean_exp_stderr(log_w: Tensor) -> tuple[float, float]:
    """log mean(w) and the delta-method standard error of it, std(w) / (mean(w) sqrt(n)), from
    log w (n,) without leaving log space for the large terms: with r = w / mean(w) (each <= n),
    std(w) / mean(w) = sqrt(n / (n - 1) (mean(r^2) - 1)). The stderr is nan for n = 1."""
    log_w = log_w.double()
    n = log_w.numel()
    log_mean = torch.logsumexp(log_w, 0) - math.log(n)
    if n < 2:
        return log_mean.item(), math.nan
    r = torch.exp(log_w - log_mean)
    relative_var = (n / (n - 1)) * (r.square().mean() - 1.0).clamp(min=0.0)
    return log_mean.item(), math.sqrt(relative_var.item() / n)


@torch.no_grad()
def ais_log_z(
    rbm: RBM, num_chains: int, num_betas: int, base_visible_bias: Tensor | None = None
) -> AISResult:
    """log Z of `rbm` by AIS with num_chains parallel chains and num_betas linearly spaced
    inverse temperatures (0 and 1 included): log Z = log Z_A + log mean w (see the module).

    base_visible_bias (D,): b_A; default the RBM's own visible biases (for binary data
    `base_rate_bias(v_train)` is the usual choice). A Gaussian RBM's base is N(b_A, sigma^2)
    with the RBM's sigma. Vectorised over chains; the log-weights accumulate in float64.
    """
    if num_chains < 1:
        raise VaekitError(f"AIS needs at least one chain, not {num_chains}.")
    if num_betas < 2:
        raise VaekitError(f"AIS needs at least 2 inverse temperatures (0 and 1), not {num_betas}.")
    if base_visible_bias is not None:
        base_visible_bias = base_visible_bias.to(rbm.visible_bias)
    betas = torch.linspace(0.0, 1.0, num_betas, dtype=torch.float64).tolist()
    hidden_zeros = rbm.weight.new_zeros(num_chains, rbm.hidden)
    v = rbm.sample_visible(hidden_zeros, 0.0, base_visible_bias)  # v_1 ~ p_A: the drive at beta 0 is b_A
    log_w = torch.zeros(num_chains, dtype=torch.float64, device=v.device)
    for k in range(1, num_betas):
        log_w += (rbm.free_energy(v, betas[k - 1], base_visible_bias)
                  - rbm.free_energy(v, betas[k], base_visible_bias)).double()
        if k < num_betas - 1:  # the last sample would only be used by a next weight
            v = rbm.gibbs_step(v, betas[k], base_visible_bias)
    log_mean_w, stderr = log_mean_exp_stderr(log_w)
    log_z_a = rbm.base_log_z(base_visible_bias).double().item()
    return AISResult(log_z=log_z_a + log_mean_w, stderr=stderr, log_weights=log_w)


@torch.no_grad()
def ais_nll(rbm: RBM, v_test: Tensor, result: AISResult, batch_size: int = 4096) -> tuple[float, float]:
    """Test NLL in nats and its standard error from an AIS estimate of log Z: v_test (N, D or *shape).

    nll = mean_n F(v_n) + log Z (-log p, a negative log-density for Gaussian visible units);
    its stderr combines the spread over examples, std_n F(v_n) / sqrt(N) (0 for N = 1), and
    the AIS stderr of log Z as independent errors: sqrt(std^2 / N + stderr_AIS^2).
    """
    free = torch.cat([rbm.free_energy(v).double() for v in v_test.split(batch_size)])  # (N,)
    n = free.numel()
    spread = free.std().item() / math.sqrt(n) if n > 1 else 0.0
    return free.mean().item() + result.log_z, math.sqrt(spread**2 + result.stderr**2)


@torch.no_grad()
def rbm_estimates(
    model: Any, x: Tensor, num_chains: int, num_betas: int, batch_size: int = 4096
) -> dict[str, float]:
    """Test numbers of a model=rbm (`vaekit.image_rbm.ImageRBM`) on images x (N, C, H, W), nats:

    {"nll", "nll_stderr", "log_z", "log_z_stderr", "free_energy"}, with nll = mean F(v) + log Z
    + model.nll_offset (the dequantized bound for Gaussian visible units, exact for binary ones)
    and log Z from `ais_log_z` started at the base-rate model (binary units) or at N(b, sigma^2).
    """
    base = model.base_bias if model.binary else None
    result = ais_log_z(model.rbm, num_chains, num_betas, base)
    v = torch.cat([model.visible_units(xb) for xb in x.split(batch_size)])
    nll, stderr = ais_nll(model.rbm, v, result, batch_size)
    return {
        "nll": nll + model.nll_offset,
        "nll_stderr": stderr,
        "log_z": result.log_z,
        "log_z_stderr": result.stderr,
        "free_energy": nll - result.log_z,
    }
