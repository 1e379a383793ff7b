"""Flow posteriors: planar, Sylvester (orthogonal, Householder, triangular) and IAF.

Log-determinants against autograd Jacobians, orthogonality of Q, invertibility under random
parameters, exact log q of the posterior's own samples, densities that integrate to one, and
the CLI.
"""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from conftest import FAST, run_vaekit
from torch.autograd.functional import jacobian

from vaekit.errors import VaekitError
from vaekit.flows import (
    FlowDistribution,
    PlanarTransform,
    SylvesterTransform,
    householder_product,
    orthogonalize,
    permutation_matrix,
    sylvester_triangular,
)
from vaekit.flows.iaf import MADE
from vaekit.likelihoods import CategoricalLikelihood
from vaekit.models import VAE
from vaekit.nets import MLPNets
from vaekit.posteriors import GaussianPosterior, IAFPosterior, PlanarPosterior, SylvesterPosterior
from vaekit.priors import StandardPrior, VampPrior
from vaekit.syncs import SyncCounter

POSTERIORS = {
    "planar": partial(PlanarPosterior, num_flows=3),
    "orthogonal": partial(SylvesterPosterior, num_flows=3, kind="orthogonal"),
    "orthogonal_m2": partial(SylvesterPosterior, num_flows=3, kind="orthogonal", num_ortho_vecs=2),
    "householder": partial(SylvesterPosterior, num_flows=3, kind="householder", num_householder=3),
    "triangular": partial(SylvesterPosterior, num_flows=3, kind="triangular"),
    "iaf": partial(IAFPosterior, num_flows=3, context_dim=6, made_hidden=20, made_layers=2),
}


def make_posterior(name: str, latent_dim: int = 4, hidden_dim: int = 10, seed: int = 0, scale: float = 1.0):
    """A posterior head in float64 with weights scaled up and jittered, so the flows are far
    from the identity they start at."""
    torch.manual_seed(seed)
    posterior = POSTERIORS[name](hidden_dim=hidden_dim, latent_dim=latent_dim).double()
    with torch.no_grad():
        for p in posterior.parameters():
            p.mul_(scale).add_(0.1 * scale * torch.randn_like(p))
    return posterior


def per_example_log_det(transform, x: torch.Tensor) -> torch.Tensor:
    """log|det d y_b / d x_b| for each row b, from the full autograd Jacobian (B, L, B, L)."""
    full = jacobian(transform, x)
    blocks = torch.stack([full[b, :, b, :] for b in range(x.shape[0])])
    sign, log_abs = torch.linalg.slogdet(blocks)
    return log_abs, sign, full


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_every_step_log_det_equals_the_autograd_jacobian(name):
    posterior = make_posterior(name, scale=2.0)
    h = torch.randn(5, 10, dtype=torch.float64)
    q = posterior(h)
    assert isinstance(q, FlowDistribution) and q.batch_shape == (5,) and q.event_shape == (4,)
    x = q.base.sample() * 2.0
    for transform in q.transforms:
        y, log_det = transform.forward_and_log_det(x)
        torch.testing.assert_close(y, transform(x))
        torch.testing.assert_close(log_det, transform.log_abs_det_jacobian(x, y))
        expected, sign, full = per_example_log_det(transform, x)
        torch.testing.assert_close(log_det, expected, atol=1e-4, rtol=0)
        assert (sign > 0).all()
        # amortized: example b's output does not depend on example c's input
        off_diagonal = full.clone()
        for b in range(5):
            off_diagonal[b, :, b, :] = 0
        assert off_diagonal.abs().max() == 0
        x = y


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_log_q_of_own_samples_is_exact_and_matches_inversion(name):
    posterior = make_posterior(name)
    h = torch.randn(6, 10, dtype=torch.float64)
    q = posterior(h)
    z = q.rsample((7,))  # (k, B, L), as the importance-weighted estimate draws them
    assert z.shape == (7, 6, 4)
    recorded = q.log_prob(z)
    assert recorded.shape == (7, 6)
    inverted = q.log_prob(z.clone())  # not a recorded tensor: maps back through the inverses
    torch.testing.assert_close(recorded, inverted, atol=1e-8, rtol=1e-8)
    # and both equal log q0(z0) - sum of autograd log-dets along the chain
    z0 = q.base.sample((7,))
    log_q = q.base.log_prob(z0)
    x = z0
    for transform in q.transforms:
        y = transform(x)
        flat = x.reshape(-1, 4)
        log_q = log_q - per_example_log_det(lambda a, t=transform: t(a.view(7, 6, 4)).reshape(-1, 4), flat)[
            0
        ].view(7, 6)
        x = y
    torch.testing.assert_close(q.log_prob(x.clone()), log_q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["planar", "orthogonal", "householder", "triangular", "iaf"])
def test_log_prob_integrates_to_one_in_two_dimensions(name):
    posterior = make_posterior(name, latent_dim=2, scale=1.5)
    with torch.no_grad():  # a base N(0, 0.5^2 I) so the mass stays inside the grid
        posterior.base.weight.zero_()
        posterior.base.bias[:2] = 0.0
        posterior.base.bias[2:4] = math.log(0.25)
    q = posterior(torch.randn(1, 10, dtype=torch.float64))
    n, half_width = 400, 7.0
    axis = (torch.arange(n, dtype=torch.float64) + 0.5) * (2 * half_width / n) - half_width
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 1, 2)
    density = q.log_prob(grid).exp()  # (n*n, 1), every point through the inverses
    total = density.sum().item() * (2 * half_width / n) ** 2
    assert abs(total - 1.0) < 2e-3
    samples = q.sample((4000,))
    assert samples.abs().max() < half_width  # the grid holds the mass


@pytest.fixture(params=["cpu", "accelerator"])
def iteration_path(request: pytest.FixtureRequest):
    """Run a test on both paths of the iterative parts: the CPU's (stop once converged) and the
    accelerators' (fixed step counts, which a SyncCounter selects on the CPU too)."""
    if request.param == "cpu":
        yield
        return
    with SyncCounter():
        yield


def test_sylvester_q_is_orthogonal_in_float32(iteration_path):
    torch.manual_seed(1)
    eye16, eye5 = torch.eye(16), torch.eye(5)
    square = orthogonalize(torch.randn(256, 16, 16))
    tall = orthogonalize(torch.randn(256, 16, 5))
    nearly_singular = torch.randn(8, 16, 16)
    nearly_singular[:, :, 0] = nearly_singular[:, :, 1] + 1e-4 * torch.randn(8, 16)
    for q, eye in ((square, eye16), (tall, eye5), (orthogonalize(nearly_singular), eye16)):
        assert (q.mT @ q - eye).abs().max() < 1e-5
    house = householder_product(torch.randn(256, 8, 16))
    assert (house.mT @ house - eye16).abs().max() < 1e-5 and (house @ house.mT - eye16).abs().max() < 1e-5
    flip = permutation_matrix(16, True, house)
    assert torch.equal(flip.mT @ flip, eye16) and torch.equal(
        flip @ torch.arange(16.0), torch.arange(15.0, -1, -1)
    )
    # the orthogonal polar factor: the same Q whichever way it is reached
    raw = torch.randn(4, 6, 3, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(raw, full_matrices=False)
    torch.testing.assert_close(orthogonalize(raw), u @ vh, atol=1e-7, rtol=0)


@pytest.mark.parametrize("kind", ["orthogonal", "householder", "triangular"])
def test_sylvester_posterior_q_is_orthogonal(kind):
    posterior = make_posterior(kind, latent_dim=6, scale=3.0).float()
    q = posterior(torch.randn(32, 10))
    for transform in q.transforms:
        gram = transform.q.mT @ transform.q
        assert (gram - torch.eye(6)).abs().max() < 1e-5


def block_jacobians(transform, x: torch.Tensor) -> torch.Tensor:
    """d y_b / d x_b (B, L, L) of a per-example transform, one output coordinate at a time."""
    rows = [jacobian(lambda a, i=i: transform(a)[:, i].sum(), x) for i in range(x.shape[-1])]
    return torch.stack(rows, dim=1)


def test_planar_and_sylvester_stay_invertible_under_random_parameters(iteration_path):
    torch.manual_seed(2)
    b, latent = 256, 5

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64)

    for trial in range(5):
        scale = 10.0 ** (trial - 1)  # 0.1 .. 1000: saturated softplus and tanh included
        planar = PlanarTransform(randn(b, latent) * scale, randn(b, latent) * scale, randn(b) * scale)
        assert (planar.wu_hat > -1).all()  # Rezende & Mohamed's condition w^T u_hat >= -1
        r, r_tilde = sylvester_triangular(
            randn(b, latent, latent) * scale, randn(b, latent) * scale, randn(b, latent) * scale
        )
        sylvester = SylvesterTransform(
            orthogonalize(randn(b, latent, latent)), r, r_tilde, randn(b, latent) * scale
        )
        for transform in (planar, sylvester):
            x = randn(b, latent) * 3
            y, log_det = transform.forward_and_log_det(x)
            assert torch.isfinite(log_det).all()
            assert (torch.linalg.det(block_jacobians(transform, x)) > 0).all()  # orientation kept
            torch.testing.assert_close(transform.inv(y), x, atol=1e-6 * scale, rtol=1e-6)
            # injective along a random line through x: consecutive images never coincide
            t = torch.linspace(-5, 5, 201, dtype=torch.float64)[:, None, None]
            line = transform(x[None] + t * randn(1, b, latent))
            assert (line[1:] - line[:-1]).norm(dim=-1).min() > 0


def test_untrained_planar_posterior_is_its_gaussian_base():
    """u starts at 0, the identity step under the shifted constraint (u_hat = 0): training
    starts from the Gaussian posterior rather than from a random flow."""
    torch.manual_seed(3)
    q = POSTERIORS["planar"](16, 4)(torch.randn(6, 16))
    z = q.rsample((10,))
    z0 = q.base_sample(z)
    torch.testing.assert_close(z, z0, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.log_prob(z), q.base.log_prob(z0), atol=1e-6, rtol=0)
    u_zero = PlanarTransform(torch.zeros(3, 4), 1e-3 * torch.randn(3, 4), torch.randn(3))
    assert u_zero.u_hat.abs().max() < 1e-3  # Rezende & Mohamed's m gives 0.31 / ||w|| = ~150 here


@pytest.mark.parametrize("name", ["planar", "orthogonal", "iaf"])
def test_a_flow_posterior_at_one_seed_starts_from_the_gaussian_runs_weights(name):
    """Flow parts are drawn from their own RNG stream: encoder, base head and decoder equal
    those of posterior=gaussian at the same seed, so `-m posterior=gaussian,<flow>` is paired.
    The untrained planar VAE is then exactly the Gaussian one, ELBO included."""

    def vae(make_posterior):
        torch.manual_seed(4)
        return VAE(4, (1, 8, 8), MLPNets(16, 1), StandardPrior(4), make_posterior, CategoricalLikelihood(17))

    gaussian = vae(partial(GaussianPosterior, latent_dim=4))
    flow = vae(partial(POSTERIORS[name], latent_dim=4))
    for part in ("encoder", "decoder"):
        for a, b in zip(getattr(gaussian, part).parameters(), getattr(flow, part).parameters(), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(gaussian.posterior.head.weight, flow.posterior.base.weight, atol=0, rtol=0)
    if name == "planar":
        x = torch.randint(0, 17, (5, 1, 8, 8)) / 16.0
        torch.manual_seed(5)
        expected = gaussian(x).nelbo
        torch.manual_seed(5)
        torch.testing.assert_close(flow(x).nelbo, expected, atol=1e-4, rtol=1e-6)


def test_made_is_autoregressive_and_order_reverses():
    torch.manual_seed(3)
    for reverse in (False, True):
        made = MADE(5, 3, 17, 2, reverse).double()
        x, context = torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
        jac_m, jac_s = (jacobian(lambda a, i=i, f=made, c=context: f(a, c)[i], x) for i in range(2))
        order = torch.arange(5).flip(0) if reverse else torch.arange(5)
        allowed = order[:, None] > order[None, :]  # output i may depend on input j when j comes first
        for jac in (jac_m, jac_s):
            assert (jac[~allowed] == 0).all()
            assert (jac[allowed] != 0).sum() > 0.8 * allowed.sum()
        jac_context = jacobian(lambda c, f=made, a=x: f(a, c)[0], context)
        assert (jac_context != 0).all()  # every output sees the context


def test_iaf_steps_share_weights_across_data_points_and_invert():
    posterior = make_posterior("iaf")
    q = posterior(torch.randn(3, 10, dtype=torch.float64))
    assert all(t.made is step.made for t, step in zip(q.transforms, posterior.steps, strict=True))
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    for transform in q.transforms:
        torch.testing.assert_close(transform.inv(transform(x)), x)
    names = {name for name, _ in posterior.named_parameters()}
    assert names >= {"base.weight", "context.weight", "steps.0.made.out.weight"}


@pytest.mark.parametrize(
    ("posterior", "kwargs", "message"),
    [
        (PlanarPosterior, {"num_flows": 0}, "posterior.num_flows must be at least 1"),
        (SylvesterPosterior, {"kind": "givens"}, "posterior.kind must be one of"),
        (SylvesterPosterior, {"num_ortho_vecs": 9}, "posterior.num_ortho_vecs must be between 1"),
        (SylvesterPosterior, {"kind": "householder", "num_householder": 0}, "num_householder"),
        (IAFPosterior, {"made_layers": 0}, "posterior.made_layers must be at least 1"),
        (IAFPosterior, {"context_dim": 0}, "posterior.context_dim must be at least 1"),
        (IAFPosterior, {"gate_bias": float("nan")}, "posterior.gate_bias must be a finite number"),
    ],
)
def test_bad_flow_settings_are_refused_in_one_sentence(posterior, kwargs, message):
    with pytest.raises(VaekitError, match=message) as error:
        posterior(hidden_dim=8, latent_dim=4, **kwargs)
    assert str(error.value).endswith(".") and str(error.value).count(". ") == 0


@pytest.mark.parametrize("name", ["planar", "orthogonal", "iaf"])
def test_flow_vae_bounds_and_gradients(name):
    torch.manual_seed(4)
    model = VAE(
        4,
        (1, 8, 8),
        MLPNets(32, 1),
        StandardPrior(4),
        partial(POSTERIORS[name], latent_dim=4),
        CategoricalLikelihood(17),
    )
    x = torch.randint(0, 17, (6, 1, 8, 8)) / 16.0
    elbo = model(x)
    torch.testing.assert_close(elbo.nelbo, elbo.rec + elbo.kl)
    elbo.loss.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    flow_part = model.posterior.context if name == "iaf" else model.posterior.flow_params
    assert flow_part.weight.grad.abs().sum() > 0  # the flow's own parameters learn
    with torch.no_grad():
        nelbo = torch.stack([model(x).nelbo for _ in range(200)]).mean(0)
        iw = -model.log_likelihood(x, 500)
    assert (iw <= nelbo + 0.05).all()  # -log p(x) <= IW-NLL <= NELBO (Burda et al., 2016)
    assert model.reconstruct(x).shape == x.shape


def test_flow_posterior_inside_a_vampprior():
    # p(z) = 1/K sum_k q(z | u_k) evaluates each flow posterior at the model's samples: the inverses
    torch.manual_seed(5)
    prior = VampPrior(3, (1, 8, 8), num_components=4, init="random")
    planar = partial(POSTERIORS["planar"], latent_dim=3)
    model = VAE(3, (1, 8, 8), MLPNets(16, 1), prior, planar, CategoricalLikelihood(17))
    x = torch.randint(0, 17, (5, 1, 8, 8)) / 16.0
    elbo = model(x)
    assert torch.isfinite(elbo.loss).all()
    elbo.loss.mean().backward()
    assert torch.isfinite(prior.pseudo_logits.grad).all() and prior.pseudo_logits.grad.abs().sum() > 0


def test_cli_trains_flow_posteriors(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_vaekit(
        "train",
        "-m",
        "posterior=planar,sylvester,iaf",
        "model.latent_dim=4",
        *FAST,
        "trainer.log_images=false",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    for job in ("0", "1", "2"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["epochs"] == 3 and metrics["nonfinite_steps"] == 0
        assert math.isfinite(metrics["test_nelbo"]) and metrics["test_kl"] > 0
        assert metrics["test_nelbo"] < 64 * math.log(17)  # far below a uniform categorical
        assert metrics["test_iw_nll"] < metrics["test_nelbo"] + 1.0
