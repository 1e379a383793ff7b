"""Hyperspherical latents: log-Bessel, von Mises-Fisher, power spherical, the uniform prior,
their pairing with the rest of the model, and the CLI."""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, run_vaekit
from torch.distributions import kl_divergence

from vaekit.bessel import bessel_iv_ratio, log_bessel_iv, log_bessel_iv_and_ratio
from vaekit.errors import VaekitError
from vaekit.kl import kl_term
from vaekit.likelihoods import CategoricalLikelihood
from vaekit.models import VAE, check_pairing
from vaekit.nets import MLPNets
from vaekit.posteriors import PlanarPosterior, PowerSphericalPosterior, VonMisesFisherPosterior
from vaekit.priors import StandardPrior, UniformSpherePrior
from vaekit.spherical import HypersphericalUniform, PowerSpherical, VonMisesFisher

special = pytest.importorskip("scipy.special")

ORDERS = [0.0, 0.5, 1.0, 1.5, 4.0, 4.5, 9.5, 24.5, 49.0, 49.5, 50.0]
X64 = torch.logspace(-3, 5, 161, dtype=torch.float64)
CASES = [(2, 0.5), (3, 1.0), (3, 30.0), (10, 5.0), (10, 1e3), (50, 20.0), (100, 1e4), (5, 1e5)]
FAMILIES = [VonMisesFisher, PowerSpherical]


def reference_log_iv(order: float, x: np.ndarray) -> np.ndarray:
    return np.log(special.ive(order, x)) + x


def reference_ratio(order: float, x: np.ndarray) -> np.ndarray:
    return special.ive(order + 1, x) / special.ive(order, x)


def reference_mean_cosine(family: type, m: int, kappa: float) -> float:
    """E[mu^T z]: A_m(kappa) for vMF, kappa / (kappa + m - 1) for power spherical."""
    if family is VonMisesFisher:
        return float(reference_ratio(m / 2 - 1, np.array(kappa)))
    return kappa / (kappa + m - 1)


def unit(m: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(m, generator=g, dtype=dtype), dim=0)


# ---------------------------------------------------------------------------------------------
# log I_v(x)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_log_bessel_and_ratio_match_scipy(order):
    log_iv, ratio = log_bessel_iv_and_ratio(order, X64)
    x = X64.numpy()
    np.testing.assert_allclose(log_iv.numpy(), reference_log_iv(order, x), rtol=1e-9, atol=1e-7)
    np.testing.assert_allclose(ratio.numpy(), reference_ratio(order, x), rtol=1e-7)


def test_log_bessel_keeps_float32_accuracy():
    x = X64.float()
    for order in (0.0, 7.0, 49.0):
        out = log_bessel_iv(order, x)
        assert out.dtype == torch.float32
        expected = torch.from_numpy(reference_log_iv(order, X64.numpy())).float()
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("order", [0.0, 0.5, 4.0, 49.0])
def test_log_bessel_gradients_use_the_ratio(order):
    x = X64.clone().requires_grad_()
    (grad,) = torch.autograd.grad(log_bessel_iv(order, x).sum(), x)
    r = reference_ratio(order, X64.numpy())
    np.testing.assert_allclose(grad.numpy(), r + order / X64.numpy(), rtol=1e-8)
    (grad_ratio,) = torch.autograd.grad(bessel_iv_ratio(order, x).sum(), x)
    expected = 1 - r * r - (2 * order + 1) * r / X64.numpy()  # dR/dx
    np.testing.assert_allclose(grad_ratio.numpy(), expected, rtol=1e-5, atol=1e-10)  # cancels at large x
    # and against a central difference where it is well conditioned
    x0 = torch.tensor([0.01, 1.0, 30.0], dtype=torch.float64)
    h = 1e-4 * x0
    numeric = (log_bessel_iv(order, x0 + h) - log_bessel_iv(order, x0 - h)) / (2 * h)
    analytic = torch.autograd.grad(log_bessel_iv(order, x0.requires_grad_()).sum(), x0)[0]
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_log_bessel_on_the_gpu_matches_the_cpu():
    x = X64.cuda().requires_grad_()
    for order in (0.0, 4.5, 49.0):
        log_iv, ratio = log_bessel_iv_and_ratio(order, x)
        (grad,) = torch.autograd.grad(log_iv.sum(), x)
        cpu_log_iv, cpu_ratio = log_bessel_iv_and_ratio(order, X64)
        torch.testing.assert_close(log_iv.cpu(), cpu_log_iv.detach())
        torch.testing.assert_close(ratio.cpu(), cpu_ratio.detach())
        assert torch.isfinite(grad).all()


# ---------------------------------------------------------------------------------------------
# von Mises-Fisher and power spherical: samples, densities, KL, gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("m", "kappa"), CASES)
def test_samples_lie_on_the_sphere_with_the_right_mean_resultant_length(family, m, kappa):
    torch.manual_seed(m)
    n = 20000
    mu = unit(m, seed=m)
    q = family(mu, torch.tensor(kappa, dtype=torch.float64))
    z = q.sample((n,))  # (n, m)
    assert z.shape == (n, m)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(n, dtype=torch.float64))
    cosine = z @ mu
    expected = reference_mean_cosine(family, m, kappa)
    error = cosine.std().item() / math.sqrt(n)
    assert abs(cosine.mean().item() - expected) < 4.5 * error + 1e-12
    # the mean resultant length ||mean z|| (its tangent part is pure noise of size ~1/sqrt(n))
    resultant = z.mean(0).norm().item()
    assert abs(resultant - expected) < 4.5 * error + math.sqrt(m / n)
    torch.testing.assert_close(q.mean, expected * mu)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_is_correct_around_either_pole(family):
    # the reflection switches poles with the sign of mu_1: check both sides and the poles
    torch.manual_seed(0)
    for mu in ([1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [1e-9, 1.0, 0.0], [-0.6, 0.8, 0.0]):
        loc = torch.tensor(mu, dtype=torch.float64)
        z = family(loc, torch.tensor(10.0, dtype=torch.float64)).sample((20000,))
        expected = reference_mean_cosine(family, 3, 10.0)
        assert abs((z @ loc).mean().item() - expected) < 0.01
        tangent = z - (z @ loc)[:, None] * loc
        assert tangent.mean(0).norm().item() < 0.02  # no preferred direction around mu


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kappa", [0.01, 1.0, 10.0, 200.0])
def test_log_prob_integrates_to_one_on_the_circle(family, kappa):
    theta = torch.arange(40000, dtype=torch.float64) * (2 * math.pi / 40000)
    z = torch.stack([theta.cos(), theta.sin()], dim=-1)  # (n, 2) on S^1
    q = family(unit(2, seed=1), torch.tensor(kappa, dtype=torch.float64))
    total = q.log_prob(z).exp().sum() * (2 * math.pi / 40000)  # periodic: spectrally accurate
    torch.testing.assert_close(total.item(), 1.0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kappa", [0.01, 1.0, 10.0, 60.0])
def test_log_prob_integrates_to_one_on_the_two_sphere(family, kappa):
    n_theta, n_phi = 1500, 300
    theta = (torch.arange(n_theta, dtype=torch.float64) + 0.5) * (math.pi / n_theta)  # midpoints
    phi = torch.arange(n_phi, dtype=torch.float64) * (2 * math.pi / n_phi)
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    z = torch.stack([t.sin() * p.cos(), t.sin() * p.sin(), t.cos()], dim=-1)
    q = family(unit(3, seed=2), torch.tensor(kappa, dtype=torch.float64))
    area = t.sin() * (math.pi / n_theta) * (2 * math.pi / n_phi)
    total = (q.log_prob(z).exp() * area).sum()
    torch.testing.assert_close(total.item(), 1.0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("m", "kappa"), [(3, 2.0), (10, 20.0), (50, 100.0), (100, 1e4)])
def test_analytic_kl_to_the_uniform_matches_monte_carlo(family, m, kappa):
    torch.manual_seed(3)
    n = 40000
    q = family(unit(m, seed=3), torch.tensor(kappa, dtype=torch.float64))
    p = HypersphericalUniform(m, dtype=torch.float64)
    z = q.sample((n,))
    log_ratio = q.log_prob(z) - p.log_prob(z)
    error = log_ratio.std().item() / math.sqrt(n)
    kl = kl_divergence(q, p)
    assert kl.shape == () and kl.item() > 0
    assert abs(kl.item() - log_ratio.mean().item()) < 4.5 * error + 1e-9
    torch.testing.assert_close(kl, -q.entropy() + p.entropy())


@pytest.mark.parametrize("m", [2, 3, 10, 100])
def test_vmf_kl_matches_the_closed_form_with_scipy(m):
    kappa = np.logspace(-3, 5, 33)
    order = m / 2 - 1
    log_area = math.log(2) + m / 2 * math.log(math.pi) - math.lgamma(m / 2)
    log_c = order * np.log(kappa) - m / 2 * math.log(2 * math.pi) - reference_log_iv(order, kappa)
    expected = kappa * reference_ratio(order, kappa) + log_c + log_area
    q = VonMisesFisher(unit(m, 4).expand(33, m), torch.from_numpy(kappa))
    kl = kl_divergence(q, HypersphericalUniform(m, dtype=torch.float64))
    # kappa A_m(kappa) ~ 1e5 cancels against log C_m(kappa): ~1e-6 of rounding at kappa = 1e5
    np.testing.assert_allclose(kl.numpy(), expected, rtol=1e-6, atol=1e-9)
    assert (kl[:-1] < kl[1:]).all()  # KL grows with the concentration


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("m", [2, 3, 10, 100])
def test_gradients_wrt_mean_and_concentration_are_finite(family, m):
    torch.manual_seed(5)
    kappa = torch.logspace(-3, 5, 9).requires_grad_()  # float32, as in training
    raw = torch.randn(9, m, requires_grad=True)
    q = family(F.normalize(raw, dim=-1), kappa)
    z = q.rsample((4,))  # (4, 9, m)
    target = torch.randn(m)
    loss = kl_divergence(q, HypersphericalUniform(m)).sum() + (z @ target).sum() + q.log_prob(z).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(raw.grad).all() and torch.isfinite(kappa.grad).all()
    assert raw.grad.abs().sum() > 0 and kappa.grad.abs().sum() > 0


def test_power_spherical_reparameterisation_gives_the_exact_gradient():
    # d/dkappa E[mu^T z] = (m - 1) / (kappa + m - 1)^2 for the power spherical
    torch.manual_seed(6)
    m, n = 5, 200000
    kappa = torch.tensor([0.5, 4.0, 50.0], dtype=torch.float64, requires_grad=True)
    mu = unit(m, 6).expand(3, m)
    cosine = (PowerSpherical(mu, kappa).rsample((n,)) * mu).sum(-1)  # (n, 3)
    (grad,) = torch.autograd.grad(cosine.mean(0).sum(), kappa)
    expected = (m - 1) / (kappa.detach() + m - 1) ** 2
    torch.testing.assert_close(grad, expected, rtol=0.03, atol=1e-4)


def test_vmf_reparameterised_gradient_is_close_to_the_exact_one():
    # g_rep alone (Davidson et al.'s correction term g_cor dropped, as in their code) is biased
    # where few dimensions meet a moderate kappa (about -30% at m = 3, kappa = 2, measured);
    # at the latent sizes VAEs use it is within a few percent of d A_m / d kappa
    torch.manual_seed(7)
    m, n = 16, 200000
    kappa = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64, requires_grad=True)
    mu = unit(m, 7).expand(3, m)
    cosine = (VonMisesFisher(mu, kappa).rsample((n,)) * mu).sum(-1)
    (grad,) = torch.autograd.grad(cosine.mean(0).sum(), kappa)
    k = kappa.detach().numpy()
    r = reference_ratio(m / 2 - 1, k)
    exact = torch.from_numpy(1 - r * r - (m - 1) * r / k)  # dA_m/dkappa
    torch.testing.assert_close(grad, exact, rtol=0.1, atol=1e-5)


def test_uniform_on_the_sphere():
    torch.manual_seed(8)
    for dim, area in ((2, 2 * math.pi), (3, 4 * math.pi)):
        p = HypersphericalUniform(dim)
        z = p.sample((1000,))
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(1000))
        torch.testing.assert_close(p.log_prob(z), torch.full((1000,), -math.log(area)))
        assert abs(z.mean(0)).max() < 0.1
    with pytest.raises(ValueError):
        kl_divergence(
            VonMisesFisher(unit(3, 0), torch.tensor(1.0, dtype=torch.float64)), HypersphericalUniform(4)
        )


# ---------------------------------------------------------------------------------------------
# Posteriors, prior and pairing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("posterior", [VonMisesFisherPosterior, PowerSphericalPosterior])
def test_spherical_vae_uses_the_analytic_kl_and_trains(posterior):
    torch.manual_seed(9)
    model = VAE(
        6,
        (1, 8, 8),
        MLPNets(32, 1),
        UniformSpherePrior(6),
        partial(posterior, latent_dim=6),
        CategoricalLikelihood(17),
    )
    x = torch.randint(0, 17, (7, 1, 8, 8)) / 16.0
    q = model.q_z(x)
    z = q.rsample()
    assert z.shape == (7, 6)
    torch.testing.assert_close(kl_term(q, model.prior(), z), kl_divergence(q, model.prior()))
    elbo = model(x)
    assert (elbo.kl > 0).all()
    elbo.loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.sample(5).shape == (5, 1, 8, 8)
    ll = model.log_likelihood(x, 50)
    assert torch.isfinite(ll).all() and (-ll < elbo.nelbo.detach() + 5).all()


def test_uniform_sphere_prior_follows_the_model_to_its_dtype():
    prior = UniformSpherePrior(4).double()
    p = prior()
    assert p.sample((3,)).dtype == torch.float64 and p.event_shape == (4,)
    assert prior.state_dict() == {}  # nothing to save


def test_bad_spherical_settings_are_refused_in_one_sentence():
    with pytest.raises(VaekitError, match="at least 2"):
        VonMisesFisherPosterior(8, 1)
    with pytest.raises(VaekitError, match="min_concentration"):
        PowerSphericalPosterior(8, 3, min_concentration=-1.0)
    with pytest.raises(VaekitError, match="at least 2"):
        UniformSpherePrior(1)


def test_mismatched_spaces_are_refused_naming_what_fits():
    with pytest.raises(VaekitError, match="use prior=uniform_sphere"):
        check_pairing(StandardPrior(3), VonMisesFisherPosterior(8, 3))
    with pytest.raises(VaekitError, match="use posterior=vmf or power_spherical"):
        check_pairing(UniformSpherePrior(3), PlanarPosterior(8, 3))
    check_pairing(UniformSpherePrior(3), PowerSphericalPosterior(8, 3))  # fits


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_trains_spherical_posteriors_with_the_uniform_prior(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_vaekit(
        "train",
        "-m",
        "posterior=vmf,power_spherical",
        "prior=uniform_sphere",
        "model.latent_dim=5",
        *FAST,
        "trainer.log_images=false",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["epochs"] == 3 and metrics["nonfinite_steps"] == 0
        assert math.isfinite(metrics["test_nelbo"]) and metrics["test_kl"] > 0
        # a categorical likelihood over 17 levels per pixel: far below the uniform's 64 log 17
        assert metrics["test_nelbo"] < 64 * math.log(17)
        assert metrics["test_iw_nll"] < metrics["test_nelbo"] + 1.0


def test_cli_refuses_a_spherical_posterior_with_a_gaussian_prior(tmp_path):
    run_dir = tmp_path / "run"
    done = run_vaekit(
        "train", "posterior=vmf", "prior=standard", *FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("vaekit: error: ") and lines[-1].endswith("use prior=uniform_sphere.")
    assert lines[-1].count(". ") == 0  # one sentence
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"
