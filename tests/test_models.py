"""The one-level VAE: KL, importance-weighted likelihood, and a model with an exact answer."""

import math
from functools import partial

import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal

from vaekit import models
from vaekit.kl import kl_term
from vaekit.likelihoods import CategoricalLikelihood, GaussianLikelihood
from vaekit.models import VAE
from vaekit.nets import ConvNets, MLPNets, Reshape
from vaekit.posteriors import GaussianPosterior
from vaekit.priors import StandardPrior


def test_analytic_kl_matches_monte_carlo():
    torch.manual_seed(0)
    q = Independent(Normal(torch.randn(4, 3), torch.rand(4, 3) + 0.3), 1)
    p = StandardPrior(3)()
    z = q.sample((200000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(kl_term(q, p, z[0]), mc, atol=0.02, rtol=0.01)


class IdentityNets:
    """Encoder: flatten x (features = data); decoder: one linear map to the Gaussian mean."""

    def __init__(self, dims: int) -> None:
        self.hidden_dim = dims

    def encoder(self, shape):
        return nn.Flatten()

    def decoder(self, latent_dim, shape, num_params):
        return nn.Sequential(
            nn.Linear(latent_dim, math.prod(shape) * num_params), Reshape(*shape, num_params)
        )


def linear_gaussian_vae(latent: int = 2, dims: int = 3, sigma: float = 0.5) -> VAE:
    """x = W z + b + sigma * eps, z ~ N(0, I): p(x) = N(b, W W^T + sigma^2 I) exactly."""
    torch.manual_seed(5)
    model = VAE(
        latent,
        (dims,),
        IdentityNets(dims),
        StandardPrior(latent),
        partial(GaussianPosterior, latent_dim=latent),
        GaussianLikelihood(learn_std=False, std=sigma),
    )
    w, b = model.decoder[0].weight, model.decoder[0].bias
    with torch.no_grad():
        w.copy_(torch.randn(dims, latent))
        b.copy_(torch.randn(dims))
        # the exact posterior: cov = (I + W^T W / s^2)^-1, mean = cov W^T (x - b) / s^2
        cov = torch.linalg.inv(torch.eye(latent) + w.T @ w / sigma**2)
        gain = cov @ w.T / sigma**2
        head = model.posterior.head
        head.weight.zero_()
        head.bias.zero_()
        head.weight[:latent] = gain
        head.bias[:latent] = -gain @ b
        head.bias[latent:] = torch.diagonal(cov).log()  # diagonal approximation of cov
    return model


def exact_log_px(model: VAE, x: torch.Tensor, sigma: float) -> torch.Tensor:
    w, b = model.decoder[0].weight, model.decoder[0].bias
    cov = w @ w.T + sigma**2 * torch.eye(w.shape[0])
    return MultivariateNormal(b, cov).log_prob(x)


def test_iw_likelihood_converges_to_the_exact_marginal_and_is_below_nelbo():
    model = linear_gaussian_vae()
    torch.manual_seed(6)
    x = torch.randn(16, 3) * 2
    exact = exact_log_px(model, x, 0.5).detach()
    with torch.no_grad():
        nelbo = torch.stack([model(x).nelbo for _ in range(2000)]).mean(0)
    iw_5000 = model.log_likelihood(x, 5000)
    iw_10 = torch.stack([model.log_likelihood(x, 10) for _ in range(300)]).mean(0)
    assert (nelbo > -exact + 1e-3).all()  # a diagonal q is not the exact posterior: a real gap
    torch.testing.assert_close(iw_5000, exact, atol=0.02, rtol=0)
    # in expectation: -log p(x) <= IW-NLL(k=10) <= NELBO (Burda et al., 2016)
    assert (-exact <= -iw_10 + 2e-3).all() and (-iw_10 <= nelbo + 2e-3).all()
    assert (nelbo - (-iw_10)).mean() > 0.5 * (nelbo - (-exact)).mean()


def test_iw_chunking_does_not_change_the_estimate(monkeypatch):
    model = linear_gaussian_vae()
    x = torch.randn(8, 3)
    torch.manual_seed(7)
    whole = model.log_likelihood(x, 300)
    monkeypatch.setattr(models, "IW_CHUNK_ELEMENTS", 8 * 3 * 7)  # chunks of 7 samples
    torch.manual_seed(7)
    chunked = model.log_likelihood(x, 300)
    assert torch.isfinite(chunked).all()
    torch.testing.assert_close(chunked, whole, atol=0.05, rtol=0)


@pytest.mark.parametrize("net", [MLPNets(64, 2), ConvNets(8, 32)])
def test_vae_terms_gradients_and_helpers(net):
    torch.manual_seed(8)
    model = VAE(
        4,
        (1, 8, 8),
        net,
        StandardPrior(4),
        partial(GaussianPosterior, latent_dim=4),
        CategoricalLikelihood(17),
    )
    x = torch.randint(0, 17, (5, 1, 8, 8)) / 16.0
    elbo = model(x)
    torch.testing.assert_close(elbo.nelbo, elbo.rec + elbo.kl)
    torch.testing.assert_close(elbo.loss, elbo.nelbo)
    assert (elbo.kl >= 0).all() and (elbo.rec > 0).all()
    # an untrained categorical decoder is close to uniform over 17 levels per pixel
    assert abs(elbo.rec.mean().item() - 64 * math.log(17)) < 64
    elbo.loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.sample(6).shape == (6, 1, 8, 8)
    recon = model.reconstruct(x)
    assert recon.shape == x.shape and 0 <= recon.min() and recon.max() <= 1
    assert model.log_likelihood(x, 20).shape == (5,)
