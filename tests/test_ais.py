"""AIS against exact enumeration on random RBMs (weights of scale ~1), and its error bars."""

from __future__ import annotations

import math

import pytest
import torch

from vaekit.errors import VaekitError
from vaekit.evaluation.ais import ais_log_z, ais_nll, base_rate_bias, log_mean_exp_stderr
from vaekit.rbm import RBM, BernoulliRBM, GaussianBernoulliRBM


def random_rbm(kind: str, seed: int, visible: int = 16, hidden: int = 8) -> RBM:
    """A float32 RBM with weights ~ N(0, 1), biases ~ N(0, 0.5^2), sigma in [e^-0.3, e^0.3]."""
    torch.manual_seed(seed)
    rbm = BernoulliRBM(visible, hidden) if kind == "bernoulli" else GaussianBernoulliRBM(visible, hidden)
    with torch.no_grad():
        rbm.weight.normal_(0.0, 1.0)
        rbm.visible_bias.normal_(0.0, 0.5)
        rbm.hidden_bias.normal_(0.0, 0.5)
        if isinstance(rbm, GaussianBernoulliRBM):
            rbm.log_sigma.uniform_(-0.3, 0.3)
    return rbm


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian"])
def test_ais_matches_exact_log_z(kind: str):
    rbm = random_rbm(kind, seed=0)
    exact = rbm.log_z_exact().item()
    assert exact - rbm.base_log_z().item() > 5  # far from the base model: the test is not trivial
    torch.manual_seed(1)
    result = ais_log_z(rbm, num_chains=1000, num_betas=2000)
    error = result.log_z - exact
    assert abs(error) < 0.05
    assert abs(error) < 4 * result.stderr + 1e-3
    assert result.log_weights.shape == (1000,) and result.log_weights.dtype == torch.float64


def test_ais_with_the_base_rate_model_of_the_data():
    rbm = random_rbm("bernoulli", seed=2)
    torch.manual_seed(3)
    with torch.no_grad():
        v_train = torch.bernoulli(torch.sigmoid(rbm.visible_bias).expand(500, -1))
    base = base_rate_bias(v_train)
    p = v_train.mean(0).clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(base, torch.log(p / (1 - p)))
    assert base_rate_bias(torch.zeros(10, 1, 2, 2)).allclose(torch.full((4,), math.log(1e-3 / (1 - 1e-3))))
    result = ais_log_z(rbm, num_chains=500, num_betas=1000, base_visible_bias=base)
    assert abs(result.log_z - rbm.log_z_exact().item()) < 0.05


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian"])
def test_more_intermediate_distributions_shrink_the_error(kind: str):
    errors = {10: [], 1000: []}
    for seed in range(3):
        rbm = random_rbm(kind, seed=10 + seed, visible=10, hidden=6)
        exact = rbm.log_z_exact().item()
        for num_betas in errors:
            torch.manual_seed(seed)
            errors[num_betas].append(abs(ais_log_z(rbm, 200, num_betas).log_z - exact))
    few, many = sum(errors[10]) / 3, sum(errors[1000]) / 3
    assert many < 0.05 and few > 3 * many


def test_the_stderr_matches_the_spread_of_repeated_estimates():
    rbm = random_rbm("gaussian", seed=4, visible=8, hidden=6)
    torch.manual_seed(5)
    runs = [ais_log_z(rbm, num_chains=100, num_betas=200) for _ in range(30)]
    estimates = torch.tensor([r.log_z for r in runs], dtype=torch.float64)
    mean_stderr = sum(r.stderr for r in runs) / len(runs)
    ratio = estimates.std().item() / mean_stderr
    assert 0.6 < ratio < 1.6
    assert abs(estimates.mean().item() - rbm.log_z_exact().item()) < 4 * mean_stderr / math.sqrt(30) + 0.01


def test_log_mean_exp_stderr_is_the_delta_method():
    torch.manual_seed(6)
    log_w = torch.randn(50, dtype=torch.float64)
    w = log_w.exp()
    log_mean, stderr = log_mean_exp_stderr(log_w)
    assert abs(log_mean - math.log(w.mean().item())) < 1e-12
    assert abs(stderr - (w.std() / (w.mean() * math.sqrt(50))).item()) < 1e-12
    # shifting every log-weight (huge Z) changes the log mean only, and nothing overflows
    shifted_mean, shifted_stderr = log_mean_exp_stderr(log_w + 5000.0)
    assert abs(shifted_mean - 5000.0 - log_mean) < 1e-9 and abs(shifted_stderr - stderr) < 1e-12


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian"])
def test_ais_nll_matches_the_exact_nll(kind: str):
    rbm = random_rbm(kind, seed=7, visible=10, hidden=6)
    torch.manual_seed(8)
    with torch.no_grad():
        v_test = rbm.sample_visible(torch.bernoulli(torch.full((300, 6), 0.5)))
        exact = -rbm.log_prob_exact(v_test).mean().item()
        spread = rbm.free_energy(v_test).double().std().item() / math.sqrt(300)
    result = ais_log_z(rbm, num_chains=1000, num_betas=1000)
    nll, stderr = ais_nll(rbm, v_test.view(300, 1, 10), result, batch_size=64)
    assert abs(nll - exact) < 0.05 and abs(nll - exact) < 4 * result.stderr + 1e-3
    assert abs(stderr - math.hypot(spread, result.stderr)) < 1e-9


def test_ais_refuses_a_path_without_intermediate_steps():
    with pytest.raises(VaekitError, match="at least 2 inverse temperatures"):
        ais_log_z(BernoulliRBM(3, 2), num_chains=10, num_betas=1)
