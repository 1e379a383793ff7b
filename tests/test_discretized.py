"""Discretized logistic likelihoods: pmfs that sum to one, the K=1 mixture, gradients at the
edges, samples against the pmf (chi-square), expected values, and a dmol VAE built from config."""

import itertools

import pytest
import torch
from conftest import compose_train
from scipy import stats

from vaekit.discretized import DiscretizedLogistic, DiscretizedMixtureLogistic
from vaekit.errors import VaekitError
from vaekit.likelihoods import DiscretizedLogisticLikelihood, DiscretizedMixtureLikelihood
from vaekit.trust import is_trusted

# Locations (in [-1, 1] units) and log-scales that include the hard cases: far outside the data
# range, exactly on the edge levels and on a bin edge, scales far below the clamp (-7) and huge.
EXTREME_LOCS = [-50.0, 50.0, -1.0, 1.0, 0.0, 1.0 / 255, 0.3, -0.97]
EXTREME_LOG_SCALES = [-20.0, -7.0, -7.0, -10.0, 8.0, -7.0, 100.0, -3.0]


def levels(num_levels: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All data values {0, 1/(L-1), ..., 1}."""
    return torch.arange(num_levels, dtype=dtype) / (num_levels - 1)


def random_and_extreme(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n + 8,) locs and log-scales: random ones, then EXTREME_*."""
    gen = torch.Generator().manual_seed(seed)
    loc = torch.cat([2 * torch.randn(n, generator=gen), torch.tensor(EXTREME_LOCS)])
    log_scale = torch.cat([2 * torch.randn(n, generator=gen) - 2, torch.tensor(EXTREME_LOG_SCALES)])
    return loc, log_scale


def mixture_params(n: int, channels: int, num_mixtures: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    """(n, C, 1, 1, P) random dmol params, with extreme locs / log-scales in the last 4 rows."""
    assert n > 4
    K = num_mixtures
    gen = torch.Generator().manual_seed(seed)
    P = DiscretizedMixtureLogistic.num_params(K, channels)
    params = scale * torch.randn(n, channels, 1, 1, P, generator=gen)
    params[-1, :, :, :, K : 2 * K] = 50.0  # every loc far above the top level
    params[-2, :, :, :, K : 2 * K] = -50.0
    params[-3:, :, :, :, 2 * K : 3 * K] = -20.0  # log-scales far below the clamp
    params[-4, :, :, :, 2 * K : 3 * K] = 100.0
    return params


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor, alpha: float = 1e-3) -> bool:
    """Pearson's chi-square test of counts against probs, cells with expected < 5 pooled."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    obs, exp = counts[~small].double(), expected[~small]
    if small.any():
        obs = torch.cat([obs, counts[small].double().sum().view(1)])
        exp = torch.cat([exp, expected[small].sum().view(1)])
    statistic = ((obs - exp) ** 2 / exp).sum().item()
    return statistic < stats.chi2.ppf(1 - alpha, len(obs) - 1)


# --- DiscretizedLogistic ---------------------------------------------------------------------


@pytest.mark.parametrize("num_levels", [256, 17])
def test_discretized_logistic_pmf_sums_to_one(num_levels):
    loc, log_scale = random_and_extreme(40, seed=0)
    dist = DiscretizedLogistic(loc, log_scale, num_levels, event_dims=0)
    probs = dist.log_prob(levels(num_levels).view(-1, 1)).exp()  # (L, n)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(0), torch.ones(len(loc)), atol=1e-5, rtol=0)


def test_discretized_logistic_matches_the_sigmoid_differences():
    loc, log_scale = random_and_extreme(10, seed=1)
    loc, log_scale = loc.double()[:10], log_scale.double()[:10]  # moderate: plain formula is exact
    L = 17
    x = levels(L, torch.float64).view(-1, 1)
    s, y, hw = log_scale.exp(), 2 * x - 1, 1.0 / (L - 1)
    upper = torch.sigmoid((y + hw - loc) / s)
    lower = torch.sigmoid((y - hw - loc) / s)
    upper[-1], lower[0] = 1.0, 0.0  # the edge bins take the tails
    ours = DiscretizedLogistic(loc, log_scale, L, event_dims=0).log_prob(x).exp()
    torch.testing.assert_close(ours, upper - lower, atol=1e-12, rtol=1e-9)


def test_discretized_logistic_sums_over_the_event():
    gen = torch.Generator().manual_seed(2)
    loc, log_scale = torch.randn(4, 3, 2, 2, generator=gen), torch.randn(4, 3, 2, 2, generator=gen)
    x = torch.randint(0, 256, (4, 3, 2, 2), generator=gen) / 255.0
    dist = DiscretizedLogistic(loc, log_scale, 256, event_dims=3)
    assert dist.batch_shape == (4,) and dist.event_shape == (3, 2, 2)
    per_subpixel = DiscretizedLogistic(loc, log_scale, 256, event_dims=0).log_prob(x)
    torch.testing.assert_close(dist.log_prob(x), per_subpixel.sum((1, 2, 3)))


@pytest.mark.parametrize("num_levels", [256, 17])
def test_discretized_logistic_mean_is_the_pmf_expectation(num_levels):
    loc, log_scale = random_and_extreme(40, seed=3)
    dist = DiscretizedLogistic(loc.double(), log_scale.double(), num_levels, event_dims=0)
    x = levels(num_levels, torch.float64).view(-1, 1)
    expectation = (dist.log_prob(x).exp() * x).sum(0)
    assert ((dist.mean >= 0) & (dist.mean <= 1)).all()
    torch.testing.assert_close(dist.mean, expectation, atol=1e-10, rtol=0)


def test_discretized_logistic_samples_follow_the_pmf():
    torch.manual_seed(4)
    L = 17
    loc = torch.tensor([-0.9, 0.0, 0.37, 0.99, 3.0])
    log_scale = torch.tensor([-2.0, -1.0, -4.0, -3.0, 0.5])
    dist = DiscretizedLogistic(loc, log_scale, L, event_dims=0)
    samples = dist.sample((20000,))  # (20000, 5)
    assert samples.shape == (20000, 5)
    index = samples * (L - 1)
    torch.testing.assert_close(index, index.round(), atol=1e-5, rtol=0)  # on the level grid
    assert samples.min() >= 0 and samples.max() <= 1
    probs = dist.log_prob(levels(L).view(-1, 1)).exp()  # (L, 5)
    for i in range(5):
        counts = torch.bincount(index[:, i].round().long(), minlength=L)
        assert chi_square_ok(counts, probs[:, i]), i


def test_discretized_logistic_gradients_are_finite_at_the_edges_and_extremes():
    loc, log_scale = random_and_extreme(10, seed=5)
    for value in (0.0, 1.0, 128 / 255):
        loc_ = loc.clone().requires_grad_()
        log_scale_ = log_scale.clone().requires_grad_()
        x = torch.full_like(loc, value)
        log_p = DiscretizedLogistic(loc_, log_scale_, 256, event_dims=0).log_prob(x)
        assert torch.isfinite(log_p).all()
        log_p.sum().backward()
        assert torch.isfinite(loc_.grad).all() and torch.isfinite(log_scale_.grad).all()
        assert loc_.grad.abs().sum() > 0


# --- DiscretizedMixtureLogistic ----------------------------------------------------------------


@pytest.mark.parametrize("num_levels", [256, 17])
def test_grayscale_mixture_pmf_sums_to_one_and_mean_is_its_expectation(num_levels):
    params = mixture_params(12, channels=1, num_mixtures=4, seed=6)
    dist = DiscretizedMixtureLogistic(params, 4, num_levels, channels=1)
    x = levels(num_levels).view(-1, 1, 1, 1, 1)  # (L, 1, C, H, W) against batch (12,)
    probs = dist.log_prob(x).exp()  # (L, 12)
    torch.testing.assert_close(probs.sum(0), torch.ones(12), atol=1e-5, rtol=0)
    expectation = (probs * x.view(-1, 1)).sum(0)
    mean = dist.mean.view(12)
    assert ((mean >= 0) & (mean <= 1)).all()
    torch.testing.assert_close(mean, expectation, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_levels", [5, 17])
def test_rgb_mixture_pmf_sums_to_one_over_every_triple(num_levels):
    params = mixture_params(6, channels=3, num_mixtures=3, seed=7)
    dist = DiscretizedMixtureLogistic(params, 3, num_levels, channels=3)
    triples = torch.tensor(list(itertools.product(range(num_levels), repeat=3))) / (num_levels - 1)
    probs = dist.log_prob(triples.view(-1, 1, 3, 1, 1)).exp()  # (L^3, 6)
    torch.testing.assert_close(probs.sum(0), torch.ones(6), atol=1e-5, rtol=0)


def test_rgb_mixture_with_256_levels_factorizes_channel_by_channel():
    # p(r, g, b) = sum_k pi_k DL_k(r) DL_k(g | r) DL_k(b | r, g): for a fixed r, summing over all
    # 256^2 (g, b) leaves the R marginal sum_k pi_k DL_k(r), which sums to one over r.
    L, K = 256, 3
    params = mixture_params(5, channels=3, num_mixtures=K, seed=8).double()
    dist = DiscretizedMixtureLogistic(params, K, L, channels=3)
    pi = torch.softmax(params[:, 0, 0, 0, :K], -1)  # (5, K)
    r_marginal = DiscretizedLogistic(
        params[:, 0, 0, 0, K : 2 * K], params[:, 0, 0, 0, 2 * K : 3 * K], L, event_dims=0
    )
    x = levels(L, torch.float64)
    r_probs = (r_marginal.log_prob(x.view(-1, 1, 1)).exp() * pi).sum(-1)  # (L, 5)
    torch.testing.assert_close(r_probs.sum(0), torch.ones(5, dtype=torch.float64), atol=1e-10, rtol=0)
    g, b = torch.meshgrid(x, x, indexing="ij")
    for r in (0, 77, 255):
        rgb = torch.stack([torch.full_like(g, x[r].item()), g, b], -1).view(-1, 1, 3, 1, 1)
        total = dist.log_prob(rgb).exp().sum(0)  # (5,)
        torch.testing.assert_close(total, r_probs[r], atol=1e-10, rtol=1e-8)


def test_one_component_grayscale_mixture_is_the_discretized_logistic():
    gen = torch.Generator().manual_seed(9)
    params = 2 * torch.randn(5, 1, 3, 3, 3, generator=gen)  # [logit, loc, log_scale]
    x = torch.randint(0, 256, (5, 1, 3, 3), generator=gen) / 255.0
    mixture = DiscretizedMixtureLogistic(params, 1, 256, channels=1)
    single = DiscretizedLogistic(params[..., 1], params[..., 2], 256, event_dims=3)
    torch.testing.assert_close(mixture.log_prob(x), single.log_prob(x))
    torch.testing.assert_close(mixture.mean, single.mean)


def test_one_component_rgb_mixture_is_the_discretized_logistic_with_shifted_means():
    gen = torch.Generator().manual_seed(10)
    params = 2 * torch.randn(5, 3, 3, 3, 4, generator=gen)  # [logit, loc, log_scale, coeff]
    x = torch.randint(0, 256, (5, 3, 3, 3), generator=gen) / 255.0
    loc, log_scale = params[..., 1], params[..., 2]
    zero = params.clone()
    zero[..., 3] = 0.0  # no coefficients: three independent channels
    mixture = DiscretizedMixtureLogistic(zero, 1, 256, channels=3)
    single = DiscretizedLogistic(loc, log_scale, 256, event_dims=3)
    torch.testing.assert_close(mixture.log_prob(x), single.log_prob(x))
    torch.testing.assert_close(mixture.mean, single.mean)
    # with coefficients: G's mean moves by alpha y_R, B's by beta y_R + gamma y_G
    alpha, beta, gamma = torch.tanh(params[..., 3]).unbind(1)  # channel c's coefficient slot
    y = 2 * x - 1
    shifted = torch.stack(
        [loc[:, 0], loc[:, 1] + alpha * y[:, 0], loc[:, 2] + beta * y[:, 0] + gamma * y[:, 1]], 1
    )
    reference = DiscretizedLogistic(shifted, log_scale, 256, event_dims=3).log_prob(x)
    torch.testing.assert_close(DiscretizedMixtureLogistic(params, 1, 256, 3).log_prob(x), reference)


def test_mixture_log_prob_is_the_log_sum_exp_of_its_components():
    gen = torch.Generator().manual_seed(11)
    K = 3
    params = torch.randn(4, 1, 2, 2, 3 * K, generator=gen)
    x = torch.randint(0, 256, (4, 1, 2, 2), generator=gen) / 255.0
    log_pi = torch.log_softmax(params[..., :K], -1)  # (4, 1, 2, 2, K)
    components = DiscretizedLogistic(params[..., K : 2 * K], params[..., 2 * K :], 256, event_dims=0)
    log_pixel = torch.logsumexp(components.log_prob(x.unsqueeze(-1)) + log_pi, -1)  # (4, 1, 2, 2)
    ours = DiscretizedMixtureLogistic(params, K, 256, channels=1).log_prob(x)
    torch.testing.assert_close(ours, log_pixel.sum((1, 2, 3)))


@pytest.mark.parametrize("channels", [1, 3])
def test_mixture_gradients_are_finite_at_the_edges_and_extremes(channels):
    params = mixture_params(8, channels=channels, num_mixtures=3, seed=12, scale=5.0).requires_grad_()
    for value in (0.0, 1.0):
        x = torch.full((8, channels, 1, 1), value)
        log_p = DiscretizedMixtureLogistic(params, 3, 256, channels).log_prob(x)
        assert torch.isfinite(log_p).all()
        (grad,) = torch.autograd.grad(log_p.sum(), params)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_grayscale_mixture_samples_follow_the_pmf():
    torch.manual_seed(13)
    L, K = 17, 3
    params = torch.randn(3, 1, 1, 1, 3 * K, generator=torch.Generator().manual_seed(13))
    dist = DiscretizedMixtureLogistic(params, K, L, channels=1)
    samples = dist.sample((20000,))  # (20000, 3, 1, 1, 1)
    assert samples.shape == (20000, 3, 1, 1, 1)
    probs = dist.log_prob(levels(L).view(-1, 1, 1, 1, 1)).exp()  # (L, 3)
    for i in range(3):
        counts = torch.bincount((samples[:, i].flatten() * (L - 1)).round().long(), minlength=L)
        assert chi_square_ok(counts, probs[:, i]), i


def test_rgb_mixture_samples_follow_the_joint_pmf():
    torch.manual_seed(14)
    L, K = 5, 2
    gen = torch.Generator().manual_seed(14)
    params = torch.randn(2, 3, 1, 1, 4 * K, generator=gen)
    params[..., 3 * K :] *= 3  # strong channel coupling
    dist = DiscretizedMixtureLogistic(params, K, L, channels=3)
    samples = dist.sample((40000,))  # (40000, 2, 3, 1, 1)
    index = (samples * (L - 1)).round().long().view(40000, 2, 3)
    assert samples.min() >= 0 and samples.max() <= 1
    triples = torch.tensor(list(itertools.product(range(L), repeat=3)))
    probs = dist.log_prob((triples / (L - 1)).view(-1, 1, 3, 1, 1)).exp()  # (125, 2)
    for i in range(2):
        cell = (index[:, i] * torch.tensor([L * L, L, 1])).sum(-1)  # same order as product()
        assert chi_square_ok(torch.bincount(cell, minlength=L**3), probs[:, i]), i


def test_rgb_mixture_mean_is_in_range_and_exact_for_the_red_channel():
    L, K = 17, 3
    params = mixture_params(6, channels=3, num_mixtures=K, seed=15)
    dist = DiscretizedMixtureLogistic(params.double(), K, L, channels=3)
    mean = dist.mean  # (6, 3, 1, 1)
    assert mean.shape == (6, 3, 1, 1) and ((mean >= 0) & (mean <= 1)).all()
    triples = torch.tensor(list(itertools.product(range(L), repeat=3)), dtype=torch.float64) / (L - 1)
    probs = dist.log_prob(triples.view(-1, 1, 3, 1, 1)).exp()  # (L^3, 6)
    torch.testing.assert_close(mean[:, 0, 0, 0], (probs * triples[:, :1]).sum(0), atol=1e-10, rtol=0)


# --- the likelihoods and their config ----------------------------------------------------------


def test_likelihood_classes_return_the_distributions():
    torch.manual_seed(16)
    dlogistic = DiscretizedLogisticLikelihood(num_levels=256)
    assert dlogistic.num_params == 2 and dlogistic.discrete and not dlogistic.binary_data
    dist = dlogistic(torch.randn(4, 3, 8, 8, 2))
    assert isinstance(dist, DiscretizedLogistic) and dist.event_shape == (3, 8, 8)
    for channels, num_params in ((1, 15), (3, 20)):
        dmol = DiscretizedMixtureLikelihood(num_levels=256, channels=channels, num_mixtures=5)
        assert dmol.num_params == num_params and dmol.discrete and not dmol.binary_data
        dist = dmol(torch.randn(4, channels, 8, 8, num_params))
        assert isinstance(dist, DiscretizedMixtureLogistic)
        assert dist.batch_shape == (4,) and dist.event_shape == (channels, 8, 8)
        assert dist.log_prob(torch.rand(4, channels, 8, 8)).shape == (4,)
        assert dist.sample().shape == dist.mean.shape == (4, channels, 8, 8)


def test_likelihoods_refuse_what_they_cannot_model():
    for likelihood in (DiscretizedLogisticLikelihood(256), DiscretizedMixtureLikelihood(256, 3)):
        likelihood.check_dataset(256)
        with pytest.raises(VaekitError, match="num_levels=256 but the dataset has 17 levels"):
            likelihood.check_dataset(17)
    with pytest.raises(VaekitError, match="dmol on binarized data: use likelihood=bernoulli"):
        DiscretizedMixtureLikelihood(2, 1).check_dataset(2)
    with pytest.raises(VaekitError, match="dlogistic on binarized data: use likelihood=bernoulli"):
        DiscretizedLogisticLikelihood(2).check_dataset(2)
    with pytest.raises(VaekitError, match="likelihood.channels=4"):
        DiscretizedMixtureLikelihood(256, 4)
    with pytest.raises(VaekitError, match="likelihood.num_mixtures must be at least 1"):
        DiscretizedMixtureLikelihood(256, 3, num_mixtures=0)
    with pytest.raises(VaekitError, match="likelihood.channels=1 but the data have 3 channels"):
        DiscretizedMixtureLikelihood(256, 1, num_mixtures=2)(torch.randn(2, 3, 4, 4, 6))


def test_configs_resolve_and_are_trusted():
    cfg = compose_train("likelihood=dmol", "dataset.shape=[3,8,8]", "dataset.num_levels=256")
    assert cfg.likelihood.channels == 3 and cfg.likelihood.num_levels == 256
    assert cfg.likelihood.num_mixtures == 10
    cfg = compose_train("likelihood=dlogistic")
    assert cfg.likelihood.num_levels == cfg.dataset.num_levels
    assert is_trusted("vaekit.likelihoods.DiscretizedLogisticLikelihood")
    assert is_trusted("vaekit.likelihoods.DiscretizedMixtureLikelihood")


def test_a_dmol_vae_built_from_config_gives_a_finite_loss_and_gradients():
    from vaekit.build import build_model
    from vaekit.data import RawSplits

    torch.manual_seed(17)
    images = {split: torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8) for split, n in
              (("train", 16), ("val", 4), ("test", 4))}
    labels = {f"{split}_labels": torch.zeros(len(x), dtype=torch.long) for split, x in images.items()}
    raw = RawSplits(**images, **labels, num_levels=256, name="tiny_rgb")
    overrides = ["likelihood=dmol", "likelihood.num_mixtures=3", "net=conv", "model.latent_dim=4",
                 "dataset.shape=[3,8,8]", "dataset.num_levels=256"]  # fmt: skip
    cfg = compose_train(*overrides)
    model = build_model(cfg, raw)
    assert isinstance(model.likelihood, DiscretizedMixtureLikelihood) and model.likelihood.channels == 3
    x = raw.train.float() / 255.0
    loss = model(x).loss.mean()
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.sample(2).shape == (2, 3, 8, 8)
    torch.manual_seed(0)
    drawn, means = model.sample(16, draw=True), model.sample(16)  # trainer.images=sample, mean
    on_levels = lambda x: torch.equal(x, (x * 255).round() / 255)  # noqa: E731
    assert on_levels(drawn) and not on_levels(means)
    grayscale_setting = compose_train(*overrides, "likelihood.channels=1")
    with pytest.raises(VaekitError, match="likelihood.channels=1 but the data have 3 channels"):
        build_model(grayscale_setting, raw)  # refused when the model is built, before training
