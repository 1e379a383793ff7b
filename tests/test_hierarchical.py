"""Hierarchical VAEs: exact marginals, closed-form KL vs Monte Carlo, shapes and gradients for
2-4 levels, the objective's knobs, and one CLI run read back from TensorBoard."""

import json
import math
from functools import partial

import pytest
import torch
from conftest import FAST, REPO, read_events, run_vaekit
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from vaekit import hierarchical, models
from vaekit.errors import VaekitError
from vaekit.hierarchical import LOG_VAR_BOUND, TopDownVAE, TwoLevelVAE, relative_gaussian_kl
from vaekit.likelihoods import CategoricalLikelihood, GaussianLikelihood
from vaekit.models import VAE
from vaekit.nets import ConvNets, MLPNets, Reshape


class LinearNets:
    """Every net is one linear map: a hierarchical model that is linear-Gaussian throughout."""

    def __init__(self, hidden_dim: int) -> None:
        self.hidden_dim = hidden_dim

    def bn_encoder(self, shape):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), self.hidden_dim))

    def bn_decoder(self, latent_dim, shape, num_params):
        linear = nn.Linear(latent_dim, math.prod(shape) * num_params)
        return nn.Sequential(linear, Reshape(*shape, num_params))

    def bn_vector_net(self, in_dim, out_dim=None):
        return nn.Linear(in_dim, self.hidden_dim if out_dim is None else out_dim)


def gaussian_posterior(latent_dim: int):
    from vaekit.posteriors import GaussianPosterior

    return partial(GaussianPosterior, latent_dim=latent_dim)


def standard_prior(latent_dim: int):
    from vaekit.priors import StandardPrior

    return StandardPrior(latent_dim)


SIGMA_X = 0.5


def linear_gaussian(cls, seed: int = 0) -> nn.Module:
    """z2 ~ N(0, I_2), z1 = A z2 + a + N(0, diag(s1^2)) (3 dims), x = W z1 + b + N(0, 0.25 I_4),
    every net linear (so the exact posterior is Gaussian too)."""
    torch.manual_seed(seed)
    kwargs = {"levels": 2} if cls is TopDownVAE else {}
    model = cls(
        latent_dims=[3, 2],
        data_shape=(4,),
        net=LinearNets(hidden_dim=6),
        prior=standard_prior(2),
        make_posterior=gaussian_posterior(2),
        likelihood=GaussianLikelihood(learn_std=False, std=SIGMA_X),
        **kwargs,
    )
    p_net = model.top_down[0] if cls is TopDownVAE else model.p_z1_net
    with torch.no_grad():  # p(z1|z2): mean A z2 + a, log-variance a constant (bias only)
        p_net.weight[3:].zero_()
        p_net.bias[3:] = torch.tensor([-0.5, 0.3, 0.0])
        p_net.weight[:3] = torch.randn(3, 2)
        # a weakly informative x keeps the exact posterior within reach of NVAE's relative one,
        # whose mean follows mu(z2) with coefficient 1 (the exact one shrinks it)
        model.decoder[0].weight.mul_(0.5)
    return model


def exact_log_px(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    p_net = model.top_down[0] if isinstance(model, TopDownVAE) else model.p_z1_net
    a_mat, a_vec = p_net.weight[:3], p_net.bias[:3]
    var_1 = torch.exp(LOG_VAR_BOUND * torch.tanh(p_net.bias[3:] / LOG_VAR_BOUND))  # the soft clamp
    w, b = model.decoder[0].weight, model.decoder[0].bias
    cov_z1 = a_mat @ a_mat.T + torch.diag(var_1)
    cov_x = w @ cov_z1 @ w.T + SIGMA_X**2 * torch.eye(4)
    return MultivariateNormal(w @ a_vec + b, cov_x).log_prob(x)


@pytest.mark.parametrize("cls", [TopDownVAE, TwoLevelVAE])
def test_iw_likelihood_converges_to_the_exact_two_level_marginal(cls):
    model = linear_gaussian(cls)
    # a posterior roughly fitted to the model makes 4000 samples plenty for 0.05 nats
    generative = ("top_down", "p_z1_net", "decoder")
    variational = [p for n, p in model.named_parameters() if not n.startswith(generative)]
    opt = torch.optim.Adam(variational, lr=0.02)
    torch.manual_seed(1)
    data = MultivariateNormal(torch.zeros(4), torch.eye(4)).sample((256,))
    for _ in range(300):
        opt.zero_grad()
        model(data).loss.mean().backward()
        opt.step()
    x = data[:12]
    with torch.no_grad():
        exact = exact_log_px(model, x)
        nelbo = torch.stack([model(x).nelbo for _ in range(500)]).mean(0)
    torch.manual_seed(2)
    iw = model.log_likelihood(x, 4000)
    gap = nelbo + exact  # NELBO - (-log p(x)) >= 0: the ELBO is a lower bound
    assert (gap >= -0.01).all() and gap.mean() > 0.1  # ... with a real gap to close
    torch.testing.assert_close(iw, exact, atol=0.1, rtol=0)
    assert (iw - exact).abs().mean() < 0.2 * gap.mean()


def test_relative_kl_equals_torch_and_monte_carlo():
    torch.manual_seed(3)
    mu, log_var = torch.randn(5, 4), torch.randn(5, 4)
    delta_mu, delta_log_var = 0.7 * torch.randn(5, 4), 0.5 * torch.randn(5, 4)
    p = Independent(Normal(mu, torch.exp(0.5 * log_var)), 1)
    q = Independent(Normal(mu + delta_mu, torch.exp(0.5 * (log_var + delta_log_var))), 1)
    closed = relative_gaussian_kl(delta_mu, log_var, delta_log_var)
    torch.testing.assert_close(closed, kl_divergence(q, p))
    z = q.sample((400000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(closed, mc, atol=0.03, rtol=0.01)


def test_topdown_lower_level_kl_equals_its_monte_carlo_estimate():
    """KL_1 in forward() (closed form at the sampled z2) = E_q[log q(z1|z2,x) - log p(z1|z2)]."""
    model = build(TopDownVAE, 2, MLPNets(32, 1))
    x = torch.randint(0, 17, (3, 1, 8, 8)) / 16.0
    with torch.no_grad():
        for p in model.deltas.parameters():  # a posterior clearly away from the prior
            p.add_(0.3 * torch.randn_like(p))
        r = model.deterministic_path(x)
        z2 = model.posterior(r[-1]).sample()
        mu, log_var, delta_mu, delta_log_var = model._step(0, z2, r[0])
        closed = relative_gaussian_kl(delta_mu, log_var, delta_log_var)
        p = Independent(Normal(mu, torch.exp(0.5 * log_var)), 1)
        q = Independent(Normal(mu + delta_mu, torch.exp(0.5 * (log_var + delta_log_var))), 1)
        z1 = q.sample((200000,))
        mc = (q.log_prob(z1) - p.log_prob(z1)).mean(0)
    assert (closed > 0.5).all()
    torch.testing.assert_close(closed, mc, rtol=0.02, atol=0.02)


def build(cls, levels: int, net, latent_dims=None) -> nn.Module:
    sizes = latent_dims or [12, 8, 6, 4][:levels]
    kwargs = {"levels": levels} if cls is TopDownVAE else {}
    torch.manual_seed(4)
    return cls(
        latent_dims=sizes,
        data_shape=(1, 8, 8),
        net=net,
        prior=standard_prior(sizes[-1]),
        make_posterior=gaussian_posterior(sizes[-1]),
        likelihood=CategoricalLikelihood(17),
        **kwargs,
    )


CASES = [(TopDownVAE, n, net) for n in (2, 3, 4) for net in ("mlp", "conv")]
CASES += [(TwoLevelVAE, 2, "mlp"), (TwoLevelVAE, 2, "conv")]


@pytest.mark.parametrize(("cls", "levels", "net_name"), CASES)
def test_shapes_gradients_and_helpers(cls, levels, net_name):
    net = MLPNets(32, 2) if net_name == "mlp" else ConvNets(8, 32)
    model = build(cls, levels, net)
    sizes = model.latent_dims
    x = torch.randint(0, 17, (5, 1, 8, 8)) / 16.0
    elbo = model(x)
    names = [f"z{i + 1}" for i in range(levels)]
    assert list(elbo.kl_per_level) == names
    assert all(kl.shape == (5,) for kl in elbo.kl_per_level.values())
    torch.testing.assert_close(elbo.nelbo, elbo.rec + sum(elbo.kl_per_level.values()))
    torch.testing.assert_close(elbo.loss, elbo.nelbo)
    assert abs(elbo.rec.mean().item() - 64 * math.log(17)) < 64  # near uniform when untrained
    elbo.loss.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [
        n for n, g in grads.items() if g is None
    ]
    assert all(g.abs().sum() > 0 for n, g in grads.items()), "a parameter that gets no gradient"
    assert model.sample(6).shape == (6, 1, 8, 8)
    recon = model.reconstruct(x)
    assert recon.shape == x.shape and 0 <= recon.min() and recon.max() <= 1
    log_w = model.log_weights(x, 7)
    assert log_w.shape == (7, 5) and torch.isfinite(log_w).all()
    assert model.log_likelihood(x, 20).shape == (5,)
    means = model.posterior_means(x)
    expected = {name: (5, size) for name, size in zip(names, sizes, strict=True)}
    assert {k: tuple(v.shape) for k, v in means.items()} == expected


@pytest.mark.parametrize("cls", [TopDownVAE, TwoLevelVAE])
def test_iw_bound_is_tighter_than_the_elbo_also_in_small_chunks(cls, monkeypatch):
    model = build(cls, 2, MLPNets(32, 1)).eval()  # BatchNorm: per-example results in eval mode
    x = torch.randint(0, 17, (4, 1, 8, 8)) / 16.0
    with torch.no_grad():
        nelbo = torch.stack([model(x).nelbo for _ in range(300)]).mean(0)
    monkeypatch.setattr(models, "IW_CHUNK_ELEMENTS", 4 * 64 * 17 * 9)  # chunks of 9 samples
    iw = torch.stack([model.log_likelihood(x, 50) for _ in range(20)]).mean(0)
    assert torch.isfinite(iw).all()
    assert (-iw <= nelbo + 0.05).all() and (nelbo + iw).mean() > 0.5  # E[IW-NLL(k)] <= NELBO


def test_iw_helper_chunks_exactly():
    """Chunked evaluation visits every sample once and gives the unchunked logsumexp."""
    table = torch.randn(100, 3) * 5  # log weights of 100 samples for 3 examples
    calls: list[int] = []

    def log_weights(x, k):
        start = sum(calls)
        calls.append(k)
        return table[start : start + k]

    x = torch.zeros(3, 2)
    whole = torch.logsumexp(table, 0) - math.log(100)
    old = models.IW_CHUNK_ELEMENTS
    try:
        models.IW_CHUNK_ELEMENTS = 3 * 2 * 7  # 7 samples of 3 examples x 2 outputs
        chunked = models.iw_log_likelihood(log_weights, x, 100, outputs_per_example=2)
    finally:
        models.IW_CHUNK_ELEMENTS = old
    assert calls == [7] * 14 + [2]
    torch.testing.assert_close(chunked, whole)


@pytest.mark.parametrize("cls", [TopDownVAE, TwoLevelVAE])
def test_beta_and_free_bits_change_the_loss_not_the_nelbo(cls):
    model = build(cls, 2, MLPNets(32, 1))
    x = torch.randint(0, 17, (6, 1, 8, 8)) / 16.0

    def run(**kwargs):
        torch.manual_seed(6)
        return model(x, **kwargs)

    plain, warm, floored = run(), run(beta=0.3), run(free_bits=5.0)
    torch.testing.assert_close(warm.nelbo, plain.nelbo)
    torch.testing.assert_close(floored.nelbo, plain.nelbo)
    torch.testing.assert_close(warm.loss, plain.rec + 0.3 * plain.kl)
    floor = sum(kl.clamp(min=5.0) for kl in plain.kl_per_level.values())
    torch.testing.assert_close(floored.loss, plain.rec + floor)
    assert (floored.loss > plain.loss).all()  # untrained KLs are below 5 nats per level


def test_posterior_means_match_the_definition(monkeypatch):
    """Top: q's mean; z1: dmu_1 + E_q[mu_1(z2)], estimated with many samples of z2."""
    model = build(TopDownVAE, 2, MLPNets(32, 1)).eval()
    x = torch.randint(0, 17, (3, 1, 8, 8)) / 16.0
    torch.manual_seed(7)
    monkeypatch.setattr(hierarchical, "MC_MEAN_SAMPLES", 4000)
    means = model.posterior_means(x)
    with torch.no_grad():
        r = model.deterministic_path(x)
        q_top = model.posterior(r[-1])
        torch.testing.assert_close(means["z2"], q_top.mean)
        z2 = q_top.sample((20000,)).reshape(-1, model.latent_dim)
        r1 = r[0].expand(20000, *r[0].shape).reshape(-1, r[0].shape[-1])
        mu, _, delta_mu, _ = model._step(0, z2, r1)
        reference = (mu + delta_mu).view(20000, 3, -1).mean(0)
    torch.testing.assert_close(means["z1"], reference, atol=0.03, rtol=0)


def test_vae_posterior_means_are_the_encoder_means():
    torch.manual_seed(8)
    parts = (standard_prior(4), gaussian_posterior(4), CategoricalLikelihood(17))
    model = VAE(4, (1, 8, 8), MLPNets(32, 1), *parts)
    x = torch.rand(5, 1, 8, 8)
    means = model.posterior_means(x)
    assert list(means) == ["z"]
    torch.testing.assert_close(means["z"], model.q_z(x).mean)


def test_level_sizes_are_checked_in_one_sentence():
    message = r"model.levels=3 needs 3 latent sizes .* e.g. model.latent_dims=\[16,8,4\]"
    with pytest.raises(VaekitError, match=message):
        build(TopDownVAE, 3, MLPNets(32, 1), latent_dims=[16, 8])
    with pytest.raises(VaekitError, match="at least 2"):
        build(TopDownVAE, 1, MLPNets(32, 1), latent_dims=[16])
    with pytest.raises(VaekitError, match="needs 2 latent sizes"):
        build(TwoLevelVAE, 2, MLPNets(32, 1), latent_dims=[16, 8, 4])


def test_cli_topdown_logs_per_level_kl(tmp_path):
    run_dir = tmp_path / "run"
    result = run_vaekit(
        "train", "model=topdown", *FAST, "net.hidden_dim=64", f"hydra.run.dir={run_dir}", cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and math.isfinite(metrics["test_iw_nll"])
    assert metrics["test_kl_z1"] > 0 and metrics["test_kl_z2"] > 0
    scalars, _ = read_events(run_dir)
    for split in ("train", "val"):
        for level in ("z1", "z2"):
            values = scalars[f"{split}/kl/{level}"]
            assert [step for step, _ in values] == [1, 2, 3]
            assert all(math.isfinite(v) and v > 0 for _, v in values)
    # the levels' KLs add up to the total
    total = {step: v for step, v in scalars["val/kl"]}
    for step, z1 in scalars["val/kl/z1"]:
        z2 = dict(scalars["val/kl/z2"])[step]
        assert abs(z1 + z2 - total[step]) < 1e-3 * max(1.0, total[step])
