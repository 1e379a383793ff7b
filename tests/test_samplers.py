"""Samplers against exact distributions: Gibbs on a tiny RBM, ULA / MALA on Gaussians and on a
Gaussian RBM's marginal (a mixture of 2^H Gaussians)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from vaekit.errors import VaekitError
from vaekit.evaluation.samplers import check_langevin_target, gibbs_chain, langevin
from vaekit.rbm import BernoulliRBM, GaussianBernoulliRBM, binary_states

CHAINS = 4000


def assert_moments(x: Tensor, mean: Tensor, var: Tensor, ses: float = 4.0) -> None:
    """Per-dimension sample mean and variance of x (N, D) within `ses` Monte Carlo standard
    errors of the exact ones (the variance's from the sample fourth central moment)."""
    n = x.shape[0]
    centred = x - x.mean(0)
    mean_se = (var / n).sqrt()
    var_se = centred.square().std(0) / math.sqrt(n)
    assert ((x.mean(0) - mean).abs() < ses * mean_se).all(), (x.mean(0), mean, mean_se)
    assert ((x.var(0) - var).abs() < ses * var_se).all(), (x.var(0), var, var_se)


def quadratic(scale: Tensor):
    """E(x) = sum_i x_i^2 / (2 scale_i^2), the energy of N(0, diag(scale^2)): (B, D) -> (B,)."""

    def energy(x: Tensor) -> Tensor:
        return (0.5 * (x / scale).square()).sum(-1)

    return energy


def gaussian_rbm(seed: int) -> GaussianBernoulliRBM:
    torch.manual_seed(seed)
    rbm = GaussianBernoulliRBM(2, 3).double()
    with torch.no_grad():
        rbm.weight.normal_(0.0, 1.0)
        rbm.visible_bias.normal_(0.0, 0.5)
        rbm.hidden_bias.normal_(0.0, 0.5)
        rbm.log_sigma.uniform_(-0.3, 0.3)
    return rbm


def exact_rbm_moments(rbm: GaussianBernoulliRBM) -> tuple[Tensor, Tensor]:
    """Mean and variance of p(v) = sum_h p(h) N(b + W h, sigma^2), p(h) ∝ exp(-hidden_free_energy(h))."""
    with torch.no_grad():
        hs = binary_states(rbm.hidden, dtype=torch.float64)
        p_h = torch.softmax(-rbm.hidden_free_energy(hs), 0)  # (2^H,)
        means = rbm.visible_mean(hs)  # (2^H, D)
        mean = p_h @ means
        return mean, rbm.sigma.square() + p_h @ means.square() - mean.square()


@pytest.mark.parametrize("mala, step_size, steps", [(False, 0.02, 1500), (True, 0.2, 300)])
def test_langevin_samples_a_gaussian_rbm_marginal(mala: bool, step_size: float, steps: int):
    rbm = gaussian_rbm(seed=0)
    check_langevin_target(rbm)
    mean, var = exact_rbm_moments(rbm)
    torch.manual_seed(1)
    x0 = 2.0 * torch.randn(CHAINS, 2, dtype=torch.float64)
    result = langevin(rbm.free_energy, x0, steps=steps, step_size=step_size, mala=mala)
    assert_moments(result.x, mean, var)
    if mala:
        assert 0.0 < result.accept_rate <= 1.0
    else:
        assert result.accept_rate is None


def test_ula_has_its_known_bias_and_mala_removes_it():
    scale = torch.tensor([0.5, 2.0], dtype=torch.float64)
    eta = 0.2
    torch.manual_seed(2)
    x0 = torch.randn(CHAINS, 2, dtype=torch.float64)
    # ULA on N(0, s^2) is the AR(1) chain x' = a x + noise sqrt(eta) w, a = 1 - eta / (2 s^2):
    # it keeps N(0, noise^2 eta / (1 - a^2)), 25% too wide in the first dimension at this step
    a = 1 - eta / (2 * scale.square())
    for noise in (1.0, 0.5):
        ula = langevin(quadratic(scale), x0, steps=400, step_size=eta, noise_scale=noise)
        assert_moments(ula.x, torch.zeros(2), noise**2 * eta / (1 - a.square()))
    mala = langevin(quadratic(scale), x0, steps=400, step_size=eta, mala=True)
    assert_moments(mala.x, torch.zeros(2), scale.square())
    assert 0.5 < mala.accept_rate < 1.0
    small = langevin(quadratic(scale), x0, steps=2000, step_size=0.02)
    assert_moments(small.x, torch.zeros(2), scale.square())


def test_mala_with_clamp_targets_the_truncated_density():
    torch.manual_seed(3)
    x0 = torch.rand(CHAINS, 1, dtype=torch.float64)
    result = langevin(quadratic(torch.ones(1)), x0, steps=300, step_size=0.3, clamp=(0.0, 10.0), mala=True)
    assert result.x.min() >= 0.0
    # the half-normal: mean sqrt(2 / pi), variance 1 - 2 / pi
    assert_moments(result.x, torch.tensor([math.sqrt(2 / math.pi)]), torch.tensor([1 - 2 / math.pi]))
    ula = langevin(quadratic(torch.ones(1)), 3 * x0, steps=5, step_size=0.3, clamp=(0.0, 1.0))
    assert ula.x.min() >= 0.0 and ula.x.max() <= 1.0


def test_grad_clip_caps_each_drift():
    x0 = torch.tensor([[30.0, 40.0], [0.3, 0.4]], dtype=torch.float64)
    result = langevin(quadratic(torch.ones(2)), x0, steps=1, step_size=0.1, noise_scale=0.0, grad_clip=1.0)
    # grad E = x: norms 50 (clipped to 1) and 0.5 (kept); x' = x - (eta / 2) clipped grad
    expected = torch.stack([x0[0] - 0.05 * x0[0] / 50, x0[1] - 0.05 * x0[1]])
    torch.testing.assert_close(result.x, expected, rtol=0, atol=1e-12)
    assert abs(result.grad_norm - (50 + 0.5) / 2) < 1e-12


def test_langevin_leaves_no_gradients_and_works_without_grad_mode():
    rbm = gaussian_rbm(seed=4)
    x0 = torch.randn(8, 1, 2, dtype=torch.float64)  # image-shaped: the free energy flattens it
    with torch.no_grad():
        out = langevin(rbm.free_energy, x0, steps=3, step_size=0.1, mala=True)
    with torch.inference_mode():
        also = langevin(rbm.free_energy, x0, steps=3, step_size=0.1)
    assert out.x.shape == also.x.shape == (8, 1, 2) and torch.isfinite(also.x).all()
    assert all(p.grad is None for p in rbm.parameters())
    assert not out.x.requires_grad


def test_mala_refuses_a_scaled_noise():
    with pytest.raises(VaekitError, match="noise_scale=1, not 0.5"):
        langevin(quadratic(torch.ones(1)), torch.zeros(2, 1), 1, 0.1, noise_scale=0.5, mala=True)


def test_langevin_refuses_an_energy_that_is_not_per_example():
    with pytest.raises(VaekitError, match="map a batch of 2 states to 2 energies, not to shape"):
        langevin(lambda x: x.square().sum(), torch.zeros(2, 1), 1, 0.1)


def test_langevin_refuses_binary_visible_units():
    match = "Langevin sampling needs continuous visible units, and this BernoulliRBM"
    with pytest.raises(VaekitError, match=match):
        check_langevin_target(BernoulliRBM(4, 2))


def test_gibbs_chain_samples_the_exact_distribution():
    torch.manual_seed(5)
    rbm = BernoulliRBM(3, 2).double()
    with torch.no_grad():
        rbm.weight.normal_(0.0, 1.5)
        rbm.visible_bias.normal_(0.0, 0.5)
        rbm.hidden_bias.normal_(0.0, 0.5)
        vs = binary_states(3, dtype=torch.float64)
        p = rbm.log_prob_exact(vs).exp()  # (8,)
    v = gibbs_chain(rbm, torch.zeros(CHAINS, 1, 3, dtype=torch.float64), steps=30)
    assert v.shape == (CHAINS, 1, 3)
    codes = (v.view(CHAINS, 3) * torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)).sum(1).long()
    freq = torch.bincount(codes, minlength=8).double() / CHAINS
    assert ((freq - p).abs() < 4 * (p * (1 - p) / CHAINS).sqrt()).all()
