"""Likelihood families: log-probabilities against torch's reference formulas."""

import itertools
import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal

from vaekit.errors import VaekitError
from vaekit.likelihoods import (
    BLOCK_ELEMENTS,
    BernoulliLikelihood,
    CategoricalLikelihood,
    GaussianLikelihood,
    QuantizedCategorical,
    bernoulli_log_density,
)


def test_quantized_categorical_matches_torch_categorical():
    torch.manual_seed(0)
    logits = torch.randn(5, 1, 3, 3, 17)  # (B, C, H, W, K)
    levels = torch.randint(0, 17, (5, 1, 3, 3))
    ours = CategoricalLikelihood(17)(logits).log_prob(levels / 16.0)
    reference = Categorical(logits=logits).log_prob(levels).sum((1, 2, 3))
    torch.testing.assert_close(ours, reference)


def test_quantized_categorical_sums_to_one_over_all_values():
    torch.manual_seed(1)
    dist = QuantizedCategorical(torch.randn(2, 3), event_dims=1)  # two pixels, 3 levels each
    values = torch.tensor(list(itertools.product([0.0, 0.5, 1.0], repeat=2)))  # (9, 2)
    total = dist.log_prob(values[:, None, :].expand(9, 1, 2)).exp().sum(0)
    torch.testing.assert_close(total, torch.ones(1))


def test_quantized_categorical_mean_and_sample_agree():
    torch.manual_seed(2)
    dist = QuantizedCategorical(torch.randn(4, 5), event_dims=1)
    samples = dist.sample((20000,))  # (20000, 4) values in {0, .25, ..., 1}
    assert set(samples.unique().tolist()) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    torch.testing.assert_close(samples.mean(0), dist.mean, atol=0.02, rtol=0)


def test_bernoulli_matches_torch_and_sums_to_one():
    torch.manual_seed(3)
    logits = torch.randn(6, 1, 4, 4, 1) * 3
    x = torch.bernoulli(torch.full((6, 1, 4, 4), 0.3))
    ours = BernoulliLikelihood()(logits).log_prob(x)
    reference = Bernoulli(logits=logits.squeeze(-1)).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(ours, reference)
    p0, p1 = (bernoulli_log_density(logits, torch.tensor(v)).exp() for v in (0.0, 1.0))
    torch.testing.assert_close(p0 + p1, torch.ones_like(p0))  # sums to one at every pixel
    assert BernoulliLikelihood.binary_data


def test_bernoulli_log_density_is_exact_to_float32_at_every_logit_and_has_bces_gradient():
    edges = torch.tensor([-88.0, -87.0, 79.9, 80.1, 90.0, 1e-8])
    logits = torch.cat([torch.linspace(-200, 200, 4001), edges])
    for value in (0.0, 1.0, 0.3):  # 0.3: the formula holds for any x, as torch's does
        x = torch.full_like(logits, value)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        exact = -bce(logits.double(), x.double(), reduction="none")
        ours = bernoulli_log_density(logits, x)
        assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
        # float32's own rounding of the result (|value| up to 200) is part of the bound
        assert ((ours.double() - exact).abs() <= 2e-7 + 1.2e-7 * exact.abs()).all()
    # gradients against float64 finite differences, with x broadcast over a batch of logits
    lg = (torch.randn(3, 5, dtype=torch.float64) * 4).requires_grad_()
    x = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bernoulli_log_density, (lg, x))
    (grad,) = torch.autograd.grad(bernoulli_log_density(lg, x.detach()).sum(), lg)
    torch.testing.assert_close(grad, x.detach() - torch.sigmoid(lg.detach()))


@pytest.mark.parametrize("learn_std", [True, False])
def test_gaussian_log_prob(learn_std):
    torch.manual_seed(4)
    lik = GaussianLikelihood(learn_std=learn_std, std=0.2, min_std=0.01)
    params = torch.randn(3, 10, lik.num_params)
    x = torch.rand(3, 10)
    if learn_std:
        std = 0.01 + torch.nn.functional.softplus(params[..., 1])
    else:
        std = torch.full_like(x, 0.2)
    reference = Normal(params[..., 0], std).log_prob(x).sum(-1)
    torch.testing.assert_close(lik(params).log_prob(x), reference)
    manual = (-0.5 * ((x - params[..., 0]) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    torch.testing.assert_close(lik(params).log_prob(x), manual)


def test_categorical_refuses_uneven_quantization():
    with pytest.raises(VaekitError, match="num_vals=4"):
        CategoricalLikelihood(4).check_dataset(17)
    CategoricalLikelihood(5).check_dataset(17)  # 16 / 4 levels: fine


@pytest.mark.parametrize(
    ("logits_shape", "value_shape"),
    [((300, 2, 1, 28, 28), (2, 1, 28, 28)), ((2, 3, BLOCK_ELEMENTS + 5), (3, BLOCK_ELEMENTS + 5))],
)
def test_bernoulli_log_density_in_blocks_equals_torch_on_large_broadcast_inputs(logits_shape, value_shape):
    # the first: slices of the draws dimension; the second: rows longer than a block, one by one
    torch.manual_seed(0)
    logits = torch.randn(logits_shape) * 5
    x = torch.bernoulli(torch.full(value_shape, 0.4))
    with torch.inference_mode():
        ours = bernoulli_log_density(logits, x)
        reference = Bernoulli(logits=logits).log_prob(x.expand_as(logits))
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)
