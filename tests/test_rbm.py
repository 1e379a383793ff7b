"""RBMs against brute force: free energies, log Z, the CD gradient, conditionals, PCD resume."""

from __future__ import annotations

import math

import pytest
import torch

from vaekit.errors import VaekitError
from vaekit.rbm import RBM, BernoulliRBM, GaussianBernoulliRBM, binary_states


def randomize(rbm: RBM, seed: int, scale: float = 1.0) -> RBM:
    """Weights of scale ~1 and random biases (and sigmas), in float64, so brute force is exact."""
    torch.manual_seed(seed)
    rbm.double()
    with torch.no_grad():
        rbm.weight.normal_(0.0, scale)
        rbm.visible_bias.normal_(0.0, 0.5)
        rbm.hidden_bias.normal_(0.0, 0.5)
        if isinstance(rbm, GaussianBernoulliRBM):
            rbm.log_sigma.uniform_(-0.4, 0.4)
    return rbm


def brute_free_energy(rbm: RBM, v: torch.Tensor) -> torch.Tensor:
    """-log sum_h exp(-E(v, h)) by enumerating h: (B, D) -> (B,)."""
    hs = binary_states(rbm.hidden, dtype=v.dtype)  # (2^H, H)
    energies = torch.stack([rbm.energy(v, h.expand(v.shape[0], -1)) for h in hs], 1)  # (B, 2^H)
    return -torch.logsumexp(-energies, 1)


def test_bernoulli_free_energy_and_log_z_match_brute_force():
    rbm = randomize(BernoulliRBM(5, 4), seed=0)
    vs = binary_states(5, dtype=torch.float64)  # every visible configuration (32, 5)
    free = rbm.free_energy(vs)
    torch.testing.assert_close(free, brute_free_energy(rbm, vs), rtol=0, atol=1e-10)
    # log Z over both v and h, and p(v) sums to one
    joint = torch.logsumexp(-free, 0)
    torch.testing.assert_close(rbm.log_z_exact(), joint, rtol=0, atol=1e-10)
    torch.testing.assert_close(rbm.log_prob_exact(vs).exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    # the hidden side of the enumeration: sum_v exp(-E(v, h)) by brute force for every h
    hs = binary_states(4, dtype=torch.float64)
    brute = torch.stack([torch.logsumexp(-rbm.energy(vs, h.expand(32, -1)), 0) for h in hs])
    torch.testing.assert_close(-rbm.hidden_free_energy(hs), brute, rtol=0, atol=1e-10)


def test_gaussian_free_energy_matches_brute_force():
    rbm = randomize(GaussianBernoulliRBM(3, 4), seed=1)
    v = torch.randn(6, 3, dtype=torch.float64) * 2
    torch.testing.assert_close(rbm.free_energy(v), brute_free_energy(rbm, v), rtol=0, atol=1e-10)


@pytest.mark.parametrize("visible", [1, 2])
def test_gaussian_log_z_matches_numerical_integration(visible: int):
    rbm = randomize(GaussianBernoulliRBM(visible, 3), seed=2 + visible)
    # exp(-F) on a grid wide enough to hold every mixture component b + W h +- 10 sigma
    reach = (rbm.visible_bias.abs() + rbm.weight.abs().sum(1) + 10 * rbm.sigma).max().item()
    points = 20001 if visible == 1 else 1201
    axis = torch.linspace(-reach, reach, points, dtype=torch.float64)
    cell = (axis[1] - axis[0]).item() ** visible
    grid = torch.cartesian_prod(*[axis] * visible).reshape(-1, visible)
    with torch.no_grad():
        numeric = torch.logsumexp(-rbm.free_energy(grid), 0) + math.log(cell)
        assert abs(numeric.item() - rbm.log_z_exact().item()) < 1e-6


def test_conditionals_match_their_samples():
    torch.manual_seed(3)
    n = 20000
    for rbm in (randomize(BernoulliRBM(4, 3), 4), randomize(GaussianBernoulliRBM(4, 3), 5)):
        with torch.no_grad():
            h0 = torch.bernoulli(torch.full((1, 3), 0.5, dtype=torch.float64))
            v = rbm.sample_visible(h0).expand(n, -1)
            probs = rbm.hidden_probs(v[:1])[0]
            h_mean = rbm.sample_hidden(v).mean(0)
            se = (probs * (1 - probs) / n).sqrt()
            assert ((h_mean - probs).abs() < 4 * se + 1e-12).all()
            h = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64).expand(n, -1)
            draws = rbm.sample_visible(h)
            mean = rbm.visible_mean(h[:1])[0]
            std = rbm.sigma if isinstance(rbm, GaussianBernoulliRBM) else (mean * (1 - mean)).sqrt()
            assert ((draws.mean(0) - mean).abs() < 4 * std / math.sqrt(n)).all()
            if isinstance(rbm, GaussianBernoulliRBM):
                torch.testing.assert_close(draws.std(0), rbm.sigma, rtol=0.03, atol=0)


@pytest.mark.parametrize("persistent", [False, True])
def test_cd_loss_gradient_is_the_cd_statistic(persistent: bool):
    rbm = randomize(BernoulliRBM(6, 4, cd_k=3, persistent=persistent, num_chains=9), seed=6)
    v_data = torch.bernoulli(torch.full((7, 6), 0.4, dtype=torch.float64))
    v_model = rbm.negatives(v_data)
    assert not v_model.requires_grad and v_model.shape == ((9, 6) if persistent else (7, 6))
    rbm.zero_grad()
    rbm.cd_loss(v_data, v_model).backward()
    with torch.no_grad():
        positive = v_data.T @ rbm.hidden_probs(v_data) / v_data.shape[0]
        negative = v_model.T @ rbm.hidden_probs(v_model) / v_model.shape[0]
        torch.testing.assert_close(rbm.weight.grad, -(positive - negative), rtol=0, atol=1e-12)
        bias_grad = -(v_data.mean(0) - v_model.mean(0))
        torch.testing.assert_close(rbm.visible_bias.grad, bias_grad, rtol=0, atol=1e-12)


def test_gaussian_cd_loss_gradient_uses_scaled_visibles():
    rbm = randomize(GaussianBernoulliRBM(3, 2), seed=7)
    v_data = torch.randn(5, 3, dtype=torch.float64)
    v_model = rbm.negatives(v_data)
    rbm.cd_loss(v_data, v_model).backward()
    with torch.no_grad():
        s = rbm.sigma.square()
        positive = (v_data / s).T @ rbm.hidden_probs(v_data) / 5
        negative = (v_model / s).T @ rbm.hidden_probs(v_model) / 5
        torch.testing.assert_close(rbm.weight.grad, -(positive - negative), rtol=0, atol=1e-12)


def test_cd_training_lowers_the_exact_nll():
    torch.manual_seed(8)
    patterns = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.float32)
    data = patterns[torch.randint(0, 2, (256,))]
    rbm = BernoulliRBM(6, 3, cd_k=1)
    optimizer = torch.optim.SGD(rbm.parameters(), lr=0.5)
    before = -rbm.log_prob_exact(data).mean().item()
    for batch in data.split(16) * 20:
        optimizer.zero_grad()
        rbm.cd_loss(batch, rbm.negatives(batch)).backward()
        optimizer.step()
    after = -rbm.log_prob_exact(data).mean().item()
    # log 64 = 4.16 at the start; 1.05 measured after; log 2 = 0.69 is the best possible
    assert before > 4.1 and after < 1.2


def test_persistent_chains_are_state_and_resume_exactly():
    torch.manual_seed(9)
    rbm = GaussianBernoulliRBM(5, 3, cd_k=2, persistent=True, num_chains=11)
    assert "chains" in rbm.state_dict() and rbm.state_dict()["chains"].shape == (11, 5)
    assert "chains" not in GaussianBernoulliRBM(5, 3).state_dict()
    v_data = torch.randn(4, 5)
    before = rbm.chains.clone()
    out = rbm.negatives(v_data)
    assert not torch.equal(rbm.chains, before) and torch.equal(rbm.chains, out)
    saved = {k: t.clone() for k, t in rbm.state_dict().items()}
    torch.manual_seed(123)
    expected = [rbm.negatives(v_data) for _ in range(3)]
    resumed = GaussianBernoulliRBM(5, 3, cd_k=2, persistent=True, num_chains=11)
    resumed.load_state_dict(saved)
    torch.manual_seed(123)
    for want in expected:
        assert torch.equal(resumed.negatives(v_data), want)


def test_image_batches_are_flattened_and_wrong_sizes_refused():
    rbm = randomize(BernoulliRBM(12, 3), seed=10)
    images = torch.rand(5, 3, 2, 2)
    torch.testing.assert_close(rbm.free_energy(images.double()), rbm.free_energy(images.double().view(5, 12)))
    with pytest.raises(VaekitError, match="12 visible units, but its input has 16"):
        rbm.free_energy(torch.rand(5, 1, 4, 4))


def test_log_z_exact_refuses_many_hidden_units():
    with pytest.raises(VaekitError, match="at most 20 hidden units, not 21"):
        BernoulliRBM(3, 21).log_z_exact()
