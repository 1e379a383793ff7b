"""Evaluation metrics: the one-pass test NELBO and IW-NLL against the training objective."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import compose_train

from vaekit.build import build
from vaekit.evaluation.importance import importance_estimates
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
    ).eval()
    x = torch.randint(0, 5, (40, 1, 4, 4)) / 4.0

    def estimates(one_pass: bool) -> torch.Tensor:
        values = []
        for seed in range(30):
            torch.manual_seed(seed)
            if one_pass:  # 25 draws per example, the KL by Monte Carlo
                values.append(importance_estimates(model, x, 25, progress=False)["nelbo"])
            else:  # the training objective: one draw
                values.append(nelbo_terms(model, x, batch_size=16)["nelbo"])
        return torch.tensor(values, dtype=torch.float64)

    one, many = estimates(False), estimates(True)
    assert many.std() < 0.4 * one.std()  # 1/sqrt(25) = 0.2 in expectation
    standard_error = (one.var() / 30 + many.var() / 30).sqrt()
    assert abs(one.mean() - many.mean()) < 4 * standard_error  # the same expectation
    torch.manual_seed(1)
    terms = importance_estimates(model, x, 4, progress=False)
    assert abs(terms["nelbo"] - terms["rec"] - terms["kl"]) < 1e-6
    assert terms["iw_nll"] <= terms["nelbo"] + 1e-6  # IW bound of the same 4 draws per example


@pytest.mark.parametrize("model", ["twolevel", "topdown"])
def test_each_levels_monte_carlo_kl_matches_the_training_objectives(model: str):
    """The pass's level terms log q - log p, averaged, estimate the same per-level KL as the
    forward pass (which uses closed forms where it can)."""
    cfg = compose_train(f"model={model}")
    torch.manual_seed(0)
    vae = build(cfg, torch.device("cpu")).model.eval()
    x = build(cfg, torch.device("cpu")).data.test[:200]
    torch.manual_seed(1)
    one_pass = importance_estimates(vae, x, 200, progress=False)
    draws = []
    for seed in range(40):
        torch.manual_seed(100 + seed)
        draws.append(nelbo_terms(vae, x, batch_size=200))
    for name in ["rec", *(key for key in one_pass if key.startswith("kl/"))]:
        forward = torch.tensor([d[name] for d in draws], dtype=torch.float64)
        error = 4 * forward.std() / 40**0.5 + 0.02 * abs(forward.mean()) + 0.05
        assert abs(one_pass[name] - forward.mean()) < error, name
    assert one_pass["iw_nll"] < one_pass["nelbo"]
