"""Evaluation metrics: the test NELBO averaged over several draws per example."""

from __future__ import annotations

from functools import partial

import torch

from vaekit.evaluation.metrics import nelbo_terms
from vaekit.likelihoods import CategoricalLikelihood
from vaekit.models import VAE
from vaekit.nets import MLPNets
from vaekit.posteriors import PlanarPosterior
from vaekit.priors import StandardPrior


def test_more_draws_per_example_keep_the_nelbo_and_shrink_its_noise():
    torch.manual_seed(0)
    model = VAE(
        3,
        (1, 4, 4),
        MLPNets(16, 1),
        StandardPrior(3),
        partial(PlanarPosterior, latent_dim=3),
        CategoricalLikelihood(5),
    )
    x = torch.randint(0, 5, (40, 1, 4, 4)) / 4.0

    def estimates(samples: int) -> torch.Tensor:
        values = []
        for seed in range(30):
            torch.manual_seed(seed)
            values.append(nelbo_terms(model, x, batch_size=16, samples=samples)["nelbo"])
        return torch.tensor(values, dtype=torch.float64)

    one, many = estimates(1), estimates(25)
    assert many.std() < 0.4 * one.std()  # 1/sqrt(25) = 0.2 in expectation
    standard_error = (one.var() / 30 + many.var() / 30).sqrt()
    assert abs(one.mean() - many.mean()) < 4 * standard_error  # the same expectation
    torch.manual_seed(1)
    terms = nelbo_terms(model, x, batch_size=16, samples=4)
    assert abs(terms["nelbo"] - terms["rec"] - terms["kl"]) < 1e-3
