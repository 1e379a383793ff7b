"""The KL helper: closed forms where they exist, otherwise a Monte Carlo estimate with a
control variate that must stay unbiased, equal the closed form while flows are the identity,
and cut the gradient noise of a flow posterior near the identity."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributions import (
    Categorical,
    Cauchy,
    Independent,
    Laplace,
    MixtureSameFamily,
    Normal,
    kl_divergence,
)

from vaekit.flows import FlowDistribution
from vaekit.kl import analytic_kl, kl_term, moment_matched_normal
from vaekit.posteriors import IAFPosterior, PlanarPosterior
from vaekit.priors import FlowPrior, MixtureOfGaussiansPrior, StandardPrior


def gaussian(batch: int, dims: int, seed: int) -> Independent:
    generator = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch, dims, generator=generator)
    scale = 0.3 + torch.rand(batch, dims, generator=generator)
    return Independent(Normal(loc, scale), 1)


def shifted(module: nn.Module, std: float, seed: int) -> nn.Module:
    """The module with every parameter moved away from its (identity) initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator))
    return module


def case(name: str) -> tuple:
    """(q, p) pairs with no closed-form KL, each far from the identity / standard normal."""
    torch.manual_seed(0)
    h = torch.randn(3, 8)
    if name == "iaf/standard":
        return IAFPosterior(8, 2, gate_bias=0.0)(h), StandardPrior(2)()
    if name == "planar/mog":
        mog = shifted(MixtureOfGaussiansPrior(2, num_components=4, init_scale=2.0), 0.5, seed=1)
        return shifted(PlanarPosterior(8, 2, num_flows=4), 0.5, seed=2)(h), mog()
    if name == "gaussian/flow":
        return gaussian(3, 2, seed=3), shifted(FlowPrior(2, num_flows=4, hidden_dim=16), 0.2, seed=4)()
    raise ValueError(name)


@pytest.mark.parametrize("name", ["iaf/standard", "planar/mog", "gaussian/flow"])
def test_the_control_variate_keeps_the_estimate_unbiased(name):
    q, p = case(name)
    with torch.no_grad():
        z = q.rsample((100_000,))  # (S, B, L)
        corrected = kl_term(q, p, z)
        plain = q.log_prob(z) - p.log_prob(z)
    difference = corrected - plain  # the control variate, with mean 0
    assert difference.abs().max() > 1e-3  # it is applied
    standard_error = difference.std(0) / difference.shape[0] ** 0.5
    assert (difference.mean(0).abs() < 4 * standard_error + 1e-4).all()


def test_kl_is_the_closed_form_while_the_flows_are_the_identity():
    q = gaussian(5, 3, seed=5)
    z = q.rsample()
    closed_form = kl_divergence(q, StandardPrior(3)())
    fresh_flow_prior = FlowPrior(3, num_flows=2, hidden_dim=8)()  # couplings start at the identity
    torch.testing.assert_close(kl_term(q, fresh_flow_prior, z), closed_form, atol=1e-5, rtol=1e-5)
    identity_flow = FlowDistribution(q, [])
    z_flow = identity_flow.rsample()
    closed = kl_divergence(q, StandardPrior(3)())
    torch.testing.assert_close(kl_term(identity_flow, StandardPrior(3)(), z_flow), closed)
    one_component = MixtureSameFamily(Categorical(logits=torch.zeros(1)), gaussian(1, 3, seed=6))
    torch.testing.assert_close(
        kl_term(q, one_component, z), kl_divergence(q, gaussian(1, 3, seed=6)), atol=1e-5, rtol=1e-5
    )


def test_moment_matched_normal_has_the_mixture_moments():
    mixture = MixtureSameFamily(Categorical(logits=torch.tensor([0.0, 1.0, -1.0])), gaussian(3, 2, seed=7))
    samples = mixture.sample((400_000,))
    matched = moment_matched_normal(mixture)
    torch.testing.assert_close(matched.mean, samples.mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(matched.variance, samples.var(0), atol=0.02, rtol=0.01)


def test_without_a_reference_the_plain_single_sample_estimate_is_used():
    q = gaussian(4, 2, seed=8)
    laplace = Independent(Laplace(torch.zeros(2, 2), torch.ones(2, 2)), 1)
    p = MixtureSameFamily(Categorical(logits=torch.zeros(2)), laplace)  # no Gaussian moments to match
    z = q.rsample()
    torch.testing.assert_close(kl_term(q, p, z), q.log_prob(z) - p.log_prob(z))


def test_control_variate_cuts_the_gradient_noise_of_an_iaf_near_the_identity():
    """IAF starts with gates near 1 (gate_bias=4): the corrected estimate's gradient with
    respect to the posterior's parameters varies far less between draws than the plain one's."""
    torch.manual_seed(9)
    posterior, p, h = IAFPosterior(8, 4), StandardPrior(4)(), torch.randn(16, 8)

    def gradient_spread(corrected: bool) -> float:
        grads = []
        for seed in range(40):
            torch.manual_seed(100 + seed)
            q = posterior(h)
            z = q.rsample()
            kl = kl_term(q, p, z) if corrected else q.log_prob(z) - p.log_prob(z)
            grads.append(torch.autograd.grad(kl.sum(), posterior.base.weight)[0].flatten())
        return torch.stack(grads).std(0).norm().item()

    assert gradient_spread(corrected=True) < 0.3 * gradient_spread(corrected=False)


def test_a_pair_without_closed_form_does_not_switch_other_pairs_of_the_same_types_to_monte_carlo():
    loc, scale = torch.zeros(3, 4), torch.ones(3, 4)
    gaussian = Independent(Normal(loc, scale), 1)
    cauchy = Independent(Cauchy(loc, scale), 1)
    assert analytic_kl(gaussian, cauchy) is None  # Normal vs Cauchy: no closed form in torch
    q = Independent(Normal(loc + 1.0, scale), 1)
    closed = analytic_kl(q, gaussian)  # same outer types (Independent, Independent)
    assert closed is not None
    torch.testing.assert_close(closed, torch.full((3,), 2.0))  # sum over 4 dims of 1/2 * 1^2
