"""Learnable priors (mog, vampprior, flow): densities that integrate to 1, samples that agree
with log_prob, RealNVP inverses and log-determinants, gradients, configs, and the CLI."""

import functools
import json
import math
from functools import partial

import pytest
import torch
from conftest import FAST, run_vaekit
from torch import nn
from torch.distributions import Categorical, ComposeTransform, Independent, Laplace, MixtureSameFamily, Normal

from vaekit import priors
from vaekit.errors import VaekitError
from vaekit.flows.realnvp import AffineCoupling, real_nvp
from vaekit.kl import kl_term
from vaekit.likelihoods import CategoricalLikelihood
from vaekit.models import VAE
from vaekit.nets import MLPNets
from vaekit.posteriors import GaussianPosterior
from vaekit.priors import FlowPrior, MixtureOfGaussiansPrior, Prior, StandardPrior, VampPrior

SHAPE = (1, 4, 4)


def vamp_model(num_components: int = 6, init: str = "random", seed: int = 0) -> VAE:
    """A small VAE on 4x4 images whose prior is a VampPrior bound to its own encoder."""
    torch.manual_seed(seed)
    prior = VampPrior(2, SHAPE, num_components=num_components, init=init)
    posterior = partial(GaussianPosterior, latent_dim=2)
    return VAE(2, SHAPE, MLPNets(16, 1), prior, posterior, CategoricalLikelihood(5))


def perturb(module: nn.Module, std: float, seed: int) -> None:
    """Move every parameter away from its (often symmetric or identity) initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def make_prior(name: str, dtype: torch.dtype = torch.float32) -> Prior:
    """A 2-D prior of each kind, with parameters far from the standard normal."""
    torch.manual_seed(1)
    if name == "mog":
        prior = MixtureOfGaussiansPrior(2, num_components=5, init_scale=2.0)
        perturb(prior, 0.5, seed=2)  # unequal weights and variances
        return prior.to(dtype)
    if name == "vampprior":
        return vamp_model().to(dtype).prior  # the model (and its encoder) stays alive via the binding
    prior = FlowPrior(2, num_flows=4, hidden_dim=32)
    perturb(prior, 0.2, seed=3)  # the fresh flow is the identity
    return prior.to(dtype)


PRIORS = ["mog", "vampprior", "flow"]


@functools.cache
def grid_density(name: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Total mass, mean (2,) and covariance (2, 2) of a prior's density by a midpoint rule
    on [-20, 20]^2 (wide: the flow's tails are heavier than a Gaussian's), in float64."""
    prior = make_prior(name, torch.float64)
    g = torch.linspace(-20, 20, 801, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(g, g, indexing="ij"), dim=-1).reshape(-1, 2)  # (G, 2)
    with torch.no_grad():
        p = prior().log_prob(z).exp() * (g[1] - g[0]) ** 2  # (G,) probability of each cell
    total = p.sum().item()
    p = p / total
    mean = p @ z
    centred = z - mean
    return total, mean, (centred * p[:, None]).T @ centred


@pytest.mark.parametrize("name", PRIORS)
def test_density_integrates_to_one_on_a_grid(name):
    total, _, _ = grid_density(name)
    assert abs(total - 1.0) < 0.01, total


@pytest.mark.parametrize("name", PRIORS)
def test_samples_have_the_density_mean_and_covariance(name):
    _, mean, cov = grid_density(name)
    prior = make_prior(name, torch.float64)
    with torch.no_grad():
        torch.manual_seed(4)
        samples = prior().sample((20000,))
    assert samples.shape == (20000, 2)
    std = cov.diagonal().sqrt()
    # 20k samples: the standard error of the mean is under 1% of a standard deviation
    torch.testing.assert_close(samples.mean(0), mean, atol=0.03 * std.max().item(), rtol=0)
    torch.testing.assert_close(samples.T.cov(), cov, atol=0.05 * cov.diagonal().max().item(), rtol=0)


def test_mixture_log_prob_is_the_logsumexp_of_joint_gaussian_components():
    prior = make_prior("mog")
    z = torch.randn(7, 2) * 2
    log_w = torch.log_softmax(prior.logits, 0)  # (K,)
    var = prior.log_vars.exp()  # (K, L)
    diff = z[:, None, :] - prior.means  # (B, K, L)
    log_n = -0.5 * (diff**2 / var + prior.log_vars + math.log(2 * math.pi)).sum(-1)  # (B, K)
    torch.testing.assert_close(prior().log_prob(z), torch.logsumexp(log_w + log_n, dim=1))


@pytest.mark.parametrize("name", ["mog", "vampprior"])
def test_chunked_mixture_log_prob_equals_the_whole_one(name, monkeypatch):
    prior = make_prior(name)
    z = torch.randn(4, 9, 2)
    with torch.no_grad():
        d = prior()
        whole = MixtureSameFamily(d.mixture_distribution, d.component_distribution).log_prob(z)
        monkeypatch.setattr(priors, "MIXTURE_CHUNK_ELEMENTS", 7 * prior.num_components * 2)  # 7 a chunk
        torch.testing.assert_close(prior().log_prob(z), whole)


def test_chunked_mixture_handles_any_component_family_and_narrow_components(monkeypatch):
    torch.manual_seed(13)
    loc, scale = 3 + torch.randn(6, 4), 0.01 + 0.05 * torch.rand(6, 4)  # far from 0, narrow
    z = loc[torch.randint(6, (50,))] + 0.03 * torch.randn(50, 4)  # (50, 4) near the components
    logits = torch.randn(6)
    for family in (Normal, Laplace):  # Normal: matrix products; Laplace: the generic chunks
        monkeypatch.setattr(priors, "MIXTURE_CHUNK_ELEMENTS", 7 * 6 * 4)
        mixture = priors.ChunkedMixture(Categorical(logits=logits), Independent(family(loc, scale), 1))
        exact = MixtureSameFamily(
            Categorical(logits=logits.double()), Independent(family(loc.double(), scale.double()), 1)
        ).log_prob(z.double())
        torch.testing.assert_close(mixture.log_prob(z).double(), exact, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("name", PRIORS)
def test_log_prob_accepts_any_batch_shape(name):
    prior = make_prior(name)
    z = torch.randn(3, 5, 2)  # (k, B, L) as in the importance-weighted estimate
    with torch.no_grad():
        whole = prior().log_prob(z)
        flat = prior().log_prob(z.reshape(15, 2)).view(3, 5)
        assert prior().sample((3, 5)).shape == (3, 5, 2)
    assert whole.shape == (3, 5)
    torch.testing.assert_close(whole, flat)


def test_realnvp_inverse_round_trip():
    torch.manual_seed(5)
    flow = ComposeTransform(list(real_nvp(5, num_flows=6, hidden_dim=32)))
    perturb(nn.ModuleList(flow.parts), 0.2, seed=6)
    x = torch.randn(64, 5)
    with torch.no_grad():
        y = flow(x)
        assert (y - x).abs().max() > 0.1  # not the identity any more
        torch.testing.assert_close(flow.inv(y), x, atol=1e-5, rtol=0)
        torch.testing.assert_close(flow(flow.inv(x)), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_realnvp_log_det_matches_the_autograd_jacobian(dim):
    torch.manual_seed(7)
    layers = real_nvp(dim, num_flows=4, hidden_dim=16).double()
    perturb(layers, 0.3, seed=8)
    flow = ComposeTransform(list(layers))
    x = torch.randn(6, dim, dtype=torch.float64)
    log_det = flow.log_abs_det_jacobian(x, flow(x))  # (6,)
    for i in range(x.shape[0]):
        jacobian = torch.autograd.functional.jacobian(flow, x[i])  # (D, D)
        sign, expected = torch.linalg.slogdet(jacobian)
        assert sign > 0
        torch.testing.assert_close(log_det[i], expected, atol=1e-10, rtol=1e-10)


def test_coupling_passes_kept_dimensions_through_and_bounds_its_scale():
    torch.manual_seed(9)
    layer = AffineCoupling(4, 8, parity=1)
    perturb(layer, 3.0, seed=10)  # huge conditioner weights
    x = torch.randn(100, 4)
    y = layer(x)
    kept = layer.mask.bool()
    torch.testing.assert_close(y[:, kept], x[:, kept])
    s, _ = layer.scale_shift(x)
    assert (s.abs() <= layer.scale.abs()).all()


def test_fresh_flow_prior_is_the_standard_normal():
    prior = FlowPrior(3, num_flows=4, hidden_dim=8)
    z = torch.randn(10, 3)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(prior().log_prob(z), expected)


@pytest.mark.parametrize("name", PRIORS)
def test_gradients_reach_every_prior_parameter(name):
    prior = make_prior(name)
    z = torch.randn(32, 2)
    prior().log_prob(z).mean().backward()
    for param_name, p in prior.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, param_name


def test_a_fresh_flow_prior_can_start_learning():
    prior = FlowPrior(2, num_flows=2, hidden_dim=8)
    prior().log_prob(torch.randn(32, 2) * 3).mean().backward()
    assert prior.flows[0].conditioner[-1].weight.grad.abs().sum() > 0  # identity start, live gradient


@pytest.mark.parametrize("name", PRIORS)
def test_building_a_prior_leaves_the_network_initialisation_alone(name):
    def model_with(prior_of):
        torch.manual_seed(12)
        prior = prior_of()
        posterior = partial(GaussianPosterior, latent_dim=2)
        model = VAE(2, SHAPE, MLPNets(16, 1), prior, posterior, CategoricalLikelihood(5))
        model.prior.initialize_from_data(torch.rand(10, *SHAPE))
        return model, torch.randn(3)  # and the noise training would draw next

    builders = {
        "mog": partial(MixtureOfGaussiansPrior, 2),
        "vampprior": partial(VampPrior, 2, SHAPE, num_components=4, init="data"),
        "flow": partial(FlowPrior, 2, hidden_dim=8),
    }
    standard, noise = model_with(partial(StandardPrior, 2))
    learnable, same_noise = model_with(builders[name])
    torch.testing.assert_close(learnable.encoder.state_dict(), standard.encoder.state_dict())
    torch.testing.assert_close(learnable.decoder.state_dict(), standard.decoder.state_dict())
    torch.testing.assert_close(same_noise, noise)  # a sweep over priors is a paired comparison


def test_vampprior_is_the_mean_of_the_posteriors_of_its_pseudo_inputs():
    model = vamp_model()
    prior = model.prior
    u = prior.pseudo_inputs()
    assert u.shape == (6, *SHAPE) and u.min() >= 0 and u.max() <= 1
    z = torch.randn(4, 2)
    expected = torch.logsumexp(model.q_z(u).log_prob(z[:, None, :]), dim=1) - math.log(6)
    torch.testing.assert_close(prior().log_prob(z), expected)


def test_vampprior_shares_the_encoder_and_trains_the_pseudo_inputs():
    model = vamp_model()
    keys = list(model.state_dict())
    assert [k for k in keys if k.startswith("prior.")] == ["prior.pseudo_logits"]  # no encoder copy
    x = torch.randint(0, 5, (8, *SHAPE)) / 4.0
    model(x).loss.mean().backward()
    assert model.prior.pseudo_logits.grad.abs().sum() > 0
    before = model.prior().log_prob(torch.zeros(2))
    with torch.no_grad():
        model.posterior.head.bias.add_(1.0)  # change the encoder: the prior follows
    assert not torch.allclose(model.prior().log_prob(torch.zeros(2)), before)


def test_vampprior_init_from_data_uses_training_examples():
    model = vamp_model(num_components=5, init="data")
    x = torch.randint(0, 5, (20, *SHAPE)) / 4.0
    torch.manual_seed(11)
    model.prior.initialize_from_data(x)
    u = model.prior.pseudo_inputs()
    eps = VampPrior.EPS
    distance = (u[:, None] - x.clamp(eps, 1 - eps)[None]).flatten(2).abs().amax(-1)  # (K, N)
    assert (distance.min(1).values < 1e-5).all()  # every pseudo-input is a training example
    more = vamp_model(num_components=50, init="data")  # more pseudo-inputs than examples
    more.prior.initialize_from_data(x)
    with pytest.raises(VaekitError, match="does not match the data's shape"):
        more.prior.initialize_from_data(torch.rand(3, 1, 8, 8))


def test_vampprior_needs_a_bound_posterior():
    with pytest.raises(VaekitError, match="binds its posterior"):
        VampPrior(2, SHAPE, num_components=3)()


def test_monte_carlo_kl_of_learnable_priors_is_unbiased():
    """No closed form: kl_term is the single-sample estimate plus a zero-mean control variate."""
    q = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(3, 2), torch.ones(3, 2)), 1)
    for name in PRIORS:
        p = make_prior(name)()
        with torch.no_grad():
            z = q.rsample((50_000,))
            difference = kl_term(q, p, z) - (q.log_prob(z) - p.log_prob(z))
        standard_error = difference.std(0) / difference.shape[0] ** 0.5
        assert (difference.mean(0).abs() < 4 * standard_error + 1e-4).all(), name


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (partial(MixtureOfGaussiansPrior, 2, num_components=0), "prior.num_components must be at least 1"),
        (partial(MixtureOfGaussiansPrior, 2, init_scale=0.0), "prior.init_scale must be positive"),
        (partial(MixtureOfGaussiansPrior, 2, init_std=-1.0), "prior.init_std must be positive"),
        (partial(VampPrior, 2, SHAPE, num_components=0), "prior.num_components must be at least 1"),
        (partial(VampPrior, 2, SHAPE, init="zeros"), "prior.init must be random or data"),
        (partial(FlowPrior, 2, num_flows=0), "prior.num_flows must be at least 1"),
        (partial(FlowPrior, 2, hidden_dim=0), "prior.hidden_dim must be at least 1"),
    ],
)
def test_bad_prior_settings_are_refused_in_one_sentence(build, message):
    with pytest.raises(VaekitError, match=message):
        build()


def test_each_learnable_prior_trains_from_the_command_line(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_vaekit(
        "train",
        "-m",
        "prior=mog,vampprior,flow",
        "model.latent_dim=2",
        *FAST,
        "trainer.log_images=false",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    for job, target in enumerate(("MixtureOfGaussiansPrior", "VampPrior", "FlowPrior")):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        config = torch.load(sweep / str(job) / "best.pt", weights_only=True)["config"]
        assert config["prior"]["_target_"].endswith(target)
        assert metrics["epochs"] == 3 and metrics["nonfinite_steps"] == 0
        values = [metrics[k] for k in ("test_nelbo", "test_rec", "test_kl", "test_iw_nll")]
        assert all(math.isfinite(v) for v in values), metrics
        assert 0 < metrics["test_iw_nll"] <= metrics["test_nelbo"] + 0.5, metrics
        assert metrics["test_nelbo"] < 64 * math.log(17)  # better than a uniform decoder already
