"""model=ebm (vaekit/ebm.py): AIS for energies against quadrature, the dequantization bound, training
on a 2-D mixture through the EBM's objective and sampler, Langevin on a known Gaussian, the replay
buffer through SIGKILL and resume, and the real command (metrics, TensorBoard, refusals, samples)."""

from __future__ import annotations

import json
import math
import signal
import time

import pytest
import torch
from conftest import compose_train, read_events, run_vaekit, write_fake_mnist
from test_resume import start_vaekit, wait_for_epoch
from test_samplers import assert_moments
from torch import Tensor, nn
from torch.distributions import Independent, Normal

from vaekit.ebm import EnergyModel
from vaekit.evaluation.ais import BoxedNormal, ebm_estimates, energy_ais_log_z
from vaekit.objectives import ContrastiveEnergy, EnergyTerms
from vaekit.training.checkpoint import load_checkpoint

EBM_RUN = ["model=ebm", "net.hidden_dim=32", "net.num_layers=1", "model.sgld_steps=5",
           "model.buffer_size=500", "model.sample_steps=10", "trainer.progress=false", "eval.ais_chains=20",
           "eval.ais_betas=50", "eval.val_ais_chains=4", "eval.val_ais_betas=10"]  # fmt: skip


class RingEnergy(nn.Module):
    """E(x) = -log sum_k w_k exp(-|x - mu_k|^2 / (2 sigma^2)) + shift for K centres on a circle of
    radius 2 with weights w_k = k (unnormalized): (B, 2) -> (B,);
    log Z = log(sum_k w_k 2 pi sigma^2) - shift."""

    def __init__(self, k: int = 8, sigma: float = 0.2, shift: float = 3.0) -> None:
        super().__init__()
        angles = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
        self.register_buffer("centres", 2.0 * torch.stack([angles.cos(), angles.sin()], 1))
        self.register_buffer("log_weights", torch.log(torch.arange(1, k + 1, dtype=torch.float64)))
        self.sigma, self.shift = sigma, shift

    def forward(self, x: Tensor) -> Tensor:
        d = (x[:, None, :].double() - self.centres).square().sum(-1)
        return (self.shift - torch.logsumexp(self.log_weights - d / (2 * self.sigma**2), 1)).to(x.dtype)


def grid_log_z(energy: nn.Module, low: float, high: float, n: int = 1601) -> float:
    """log int exp(-E) over the square [low, high]^2 by the midpoint rule on n x n cells, float64."""
    h = (high - low) / n
    axis = low + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    points = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        return float(torch.logsumexp(-energy(points.float()).double(), 0)) + 2 * math.log(h)


def test_ais_log_z_of_a_ring_of_gaussians_matches_quadrature_and_improves_with_more_betas():
    energy = RingEnergy()
    exact = grid_log_z(energy, -6.0, 6.0)
    assert exact == pytest.approx(math.log(36 * 2 * math.pi * 0.2**2) - 3.0, abs=1e-6)  # the grid is fine
    scale = torch.full((2,), 2.5, dtype=torch.float64)
    base = Independent(Normal(torch.zeros(2, dtype=torch.float64), scale), 1)
    torch.manual_seed(0)
    result = energy_ais_log_z(energy, base, num_chains=2000, num_betas=1000)
    assert abs(result.log_z - exact) < 0.05 and result.stderr < 0.05, (result.log_z, exact, result.stderr)
    rms = {}  # the root-mean-square error of 8 independent estimates with 100 chains each
    for betas in (3, 30, 300):
        torch.manual_seed(1)
        errors = torch.tensor([energy_ais_log_z(energy, base, 100, betas).log_z - exact for _ in range(8)])
        rms[betas] = float(errors.square().mean().sqrt())
    assert rms[3] > rms[30] > rms[300] and rms[3] > 2 * rms[300], rms


def test_boxed_normal_is_normalized_and_sampled_exactly():
    loc, scale = torch.tensor([0.3, 0.02]), torch.tensor([0.4, 0.01])
    low, high = torch.zeros(2), torch.ones(2)
    base = BoxedNormal(loc, scale, low, high)
    h = 1e-5
    grid = torch.arange(h / 2, 1.0, h, dtype=torch.float64)
    for i in range(2):  # each factor integrates to 1 over [0, 1]
        one = BoxedNormal(loc[i : i + 1].double(), scale[i : i + 1].double(), low[:1].double(),
                          high[:1].double())  # fmt: skip
        density = one.log_prob(grid[:, None]).exp()
        assert float(density.sum() * h) == pytest.approx(1.0, abs=1e-4)
        mean = float((density * grid).sum() * h)
        torch.manual_seed(i)
        draws = one.sample((20000,))
        assert draws.min() >= 0.0 and draws.max() <= 1.0
        assert float(draws.mean()) == pytest.approx(mean, abs=4 * float(draws.std()) / math.sqrt(20000))
    assert torch.isinf(base.log_prob(torch.tensor([[0.5, -0.01]]))).all()


class SmallEnergy(nn.Module):
    """A small SiLU MLP energy on (B, *shape) -> (B,)."""

    def __init__(self, dims: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(dims, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, 1))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


def test_the_dequantized_nll_is_an_upper_bound_close_to_the_exact_discrete_nll():
    levels = 4
    torch.manual_seed(0)
    train = torch.randint(0, levels, (200, 1, 1, 2), dtype=torch.uint8)
    model = EnergyModel((1, 1, 2), levels, energy_net=SmallEnergy(2, 16), train=train)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # a model far from flat, so the bound is not trivially tight
    energy = model.energy_net
    flat = lambda y: energy(y.view(-1, 1, 1, 2).float()).double()  # noqa: E731 (test helper)
    exact_log_z = grid_log_z(flat, 0.0, 1.0, n=400)
    x_int = torch.tensor([[0, 0], [1, 3], [2, 2], [3, 1]])
    x = (x_int.float() / (levels - 1)).view(4, 1, 1, 2)
    torch.manual_seed(1)
    estimates = ebm_estimates(model, x, num_chains=2000, num_betas=300, draws=4000)
    assert estimates["log_z"] == pytest.approx(exact_log_z, abs=0.05)
    assert float(model.log_z) == pytest.approx(estimates["log_z"], abs=1e-6)  # kept for nll_per_example
    n = 100  # exact -log P(x_int): the density integrated over each cell by the midpoint rule
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    exact = []
    for a, b in x_int.tolist():
        cell = torch.cartesian_prod((a + u) / levels, (b + u) / levels)
        with torch.no_grad():
            log_p = torch.logsumexp(-flat(cell), 0) - exact_log_z + math.log(1.0 / (levels * n) ** 2)
        exact.append(-float(log_p))
    exact_nll = sum(exact) / len(exact)
    bound = estimates["energy"] + exact_log_z + 2 * math.log(levels)
    assert bound > exact_nll - 0.02  # a bound (up to the Monte Carlo error of E_u)
    assert bound - exact_nll < 1.0 and estimates["nll"] == pytest.approx(bound, abs=0.06)
    midpoint = ((x_int.float() + 0.5) / levels).view(4, 1, 1, 2)
    expected = energy(midpoint) + 2 * math.log(levels) + estimates["log_z"]
    torch.testing.assert_close(model.nll_per_example(x), expected.detach())


MIXTURE_SIGMA = 0.3
MIXTURE_CENTRES = 2.0 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])


def mixture_draws(n: int, generator: torch.Generator) -> Tensor:
    """n points (n, 2) of the equal mixture of N(mu_k, 0.3^2 I) at the four MIXTURE_CENTRES."""
    k = torch.randint(0, 4, (n,), generator=generator)
    return MIXTURE_CENTRES[k] + MIXTURE_SIGMA * torch.randn(n, 2, generator=generator)


def mixture_log_density(x: Tensor) -> Tensor:
    d = (x[:, None, :] - MIXTURE_CENTRES).square().sum(-1)
    return torch.logsumexp(-d / (2 * MIXTURE_SIGMA**2), 1) - math.log(4 * 2 * math.pi * MIXTURE_SIGMA**2)


def test_an_ebm_trained_on_a_2d_mixture_reaches_the_true_held_out_log_density():
    generator = torch.Generator().manual_seed(0)
    train, test = mixture_draws(20000, generator), mixture_draws(2000, generator)
    torch.manual_seed(0)
    box = (-4.0, 4.0)
    eta = 0.003  # Langevin proper (noise sqrt(eta)), 40 steps per batch from a replay buffer
    model = EnergyModel((2,), None, energy_net=SmallEnergy(2, 64), train=train, sgld_steps=40,
                        sgld_step_size=eta, buffer_size=1000, reinit_prob=0.02, alpha=0.01,
                        data_range=box)  # fmt: skip
    objective = ContrastiveEnergy(val_chains=16, val_betas=100)
    iterations = 1000
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.0, 0.999))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    for _ in range(iterations):
        batch = train[torch.randint(0, train.shape[0], (128,))]
        terms = objective(model, batch, beta=1.0, free_bits=0.0)
        optimizer.zero_grad()
        terms.loss.mean().backward()
        optimizer.step()
        schedule.step()
    assert isinstance(terms, EnergyTerms)
    assert set(terms.logged_terms()) == {"energy_data", "energy_negatives", "energy_gap", "sgld_grad_norm"}
    log_z = grid_log_z(model.energy_net, *box, n=400)  # the model's density, normalized on the box
    with torch.no_grad():
        model_log_density = float((-model.energy(test).double() - log_z).mean())
    true_log_density = float(mixture_log_density(test).mean())
    assert abs(model_log_density - true_log_density) < 0.3, (model_log_density, true_log_density)


class QuadraticEnergy(nn.Module):
    """E(x) = |x - m|^2 / (2 s^2) per example, N(m, s^2 I): (B, D) -> (B,)."""

    def __init__(self, mean: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.mean, self.scale = mean, scale

    def forward(self, x: Tensor) -> Tensor:
        return (0.5 * ((x - self.mean) / self.scale).square()).sum(-1)


def test_the_ebm_sampler_with_a_tiny_step_matches_a_known_gaussian():
    # the shared sampler's own tests: tests/test_samplers.py; here through EnergyModel.langevin
    mean = torch.tensor([0.5, -1.0], dtype=torch.float64)
    scale = torch.tensor([0.3, 1.0], dtype=torch.float64)
    model = EnergyModel((2,), None, energy_net=QuadraticEnergy(mean, scale), sgld_step_size=0.002,
                        buffer_size=10, data_range=(-20.0, 20.0))  # fmt: skip
    torch.manual_seed(0)
    x0 = torch.randn(4000, 2, dtype=torch.float64)
    result = model.langevin(x0, steps=3000)
    assert_moments(result.x, mean, scale.square())
    exact = model.langevin(x0, steps=300, step_size=0.05, mala=True)  # MALA: exact at a larger step
    assert_moments(exact.x, mean, scale.square())


def test_negatives_come_from_the_replay_buffer_and_go_back_into_it():
    model = EnergyModel((2,), None, energy_net=QuadraticEnergy(torch.zeros(2), torch.ones(2)), sgld_steps=3,
                        buffer_size=8, reinit_prob=0.0, data_range=(-3.0, 3.0))  # fmt: skip
    before = model.replay.clone()
    torch.manual_seed(0)
    result = model.negatives(5)
    changed = (model.replay != before).any(1)
    assert int(changed.sum()) == 5  # five distinct slots advanced and written back
    assert torch.equal(model.replay[changed].sort(0).values, result.x.sort(0).values)
    assert result.grad_norm > 0


# -- through the real command ------------------------------------------------------------------


def test_an_ebm_trains_on_digits_and_reports_ais_numbers_in_the_vaekit_keys(tmp_path):
    run = tmp_path / "run"
    done = run_vaekit("train", *EBM_RUN, "trainer.max_epochs=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_estimator"] == "ais" and metrics["stopped_on"] == "nll"
    assert math.isfinite(metrics["test_iw_nll"]) and metrics["test_iw_nll_stderr"] > 0
    assert metrics["test_bpd"] == pytest.approx(metrics["test_iw_nll"] / (64 * math.log(2)))
    assert math.isfinite(metrics["test_log_z"]) and metrics["test_log_z_stderr"] > 0
    assert metrics["test_ais_chains"] == 20 and metrics["test_ais_betas"] == 50
    assert "test_nelbo" not in metrics
    assert "test NLL (AIS, 20 chains)" in done.stdout
    scalars, images = read_events(run)
    expected = {"train/energy_data", "train/energy_negatives", "train/energy_gap", "train/sgld_grad_norm",
                "val/nll", "val/log_z", "val/energy"}  # fmt: skip
    assert expected <= set(scalars), sorted(scalars)
    assert [step for step, _ in scalars["val/nll"]] == [1, 2]
    gap = dict(scalars["train/energy_gap"])
    data, negatives = dict(scalars["train/energy_data"]), dict(scalars["train/energy_negatives"])
    assert all(gap[s] == pytest.approx(data[s] - negatives[s], abs=1e-4) for s in gap)
    assert all(value > 0 for _, value in scalars["train/sgld_grad_norm"])
    assert any("buffer_samples" in tag for tag in images) and any("samples" in tag for tag in images)
    state = load_checkpoint(run / "last.pt")["model"]
    assert state["replay"].shape == (500, 1, 8, 8) and float(state["replay"].min()) >= 0.0
    # vaekit sample: Langevin chains from noise or from the replay buffer
    for init in ("noise", "buffer"):
        out = tmp_path / f"{init}.png"
        sampled = run_vaekit("sample", str(run), "--sampler", "langevin", "--steps", "5", "--init", init,
                             "--n", "16", "--out", str(out), cwd=tmp_path)  # fmt: skip
        assert sampled.returncode == 0, sampled.stderr
        assert out.stat().st_size > 0


def test_init_buffer_is_refused_for_a_run_that_is_not_an_ebm(tmp_path, trained_run):
    done = run_vaekit("sample", str(trained_run), "--sampler", "langevin", "--from", "1", "--init", "buffer",
                      cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "--init buffer chooses where a model=ebm's chains start" in done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prior=mog"], "model=ebm has no prior to choose: drop prior=mog."),
        (["likelihood=gaussian"], "model=ebm has no likelihood to choose"),
        (["model.sgld_steps=0"], "model.sgld_steps must be at least 1 Langevin step, not 0."),
        (["model.buffer_size=1"], "model.buffer_size=1 is smaller than a batch (trainer.batch_size=64)"),
        (["model.reinit_prob=2"], "model.reinit_prob must be a probability in [0, 1], not 2."),
        (["objective=iwae"], "model=ebm has no objective to choose: drop objective=iwae."),
    ],
)
def test_bad_ebm_settings_are_refused_in_one_sentence(tmp_path, overrides, message):
    run = tmp_path / "run"
    done = run_vaekit("train", *EBM_RUN, *overrides, f"hydra.run.dir={run}", cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("vaekit: error: ") and "Traceback" not in done.stderr
    assert not (run / "last.pt").exists() and not (run / "metrics.json").exists()  # nothing trained, written


def test_a_binary_dataset_keeps_its_levels_for_an_ebm(tmp_path):
    from vaekit.build import build

    write_fake_mnist(tmp_path / "data")
    root = tmp_path / "data"
    cfg = compose_train("model=ebm", "dataset=mnist", f"dataset.root={root}", "dataset.val_size=20")
    built = build(cfg, torch.device("cpu"))
    values = torch.unique(built.data.train)
    assert values.numel() > 2  # not binarized: the integer levels / 255
    assert not built.model.likelihood.binary_data and built.model.num_levels == 256


def test_binarize_gives_an_ebm_the_bernoulli_models_binary_data_and_its_statistics(tmp_path):
    from vaekit.build import build

    write_fake_mnist(tmp_path / "data")
    root = tmp_path / "data"
    cfg = compose_train("model=ebm", "model.binarize=true", "dataset=mnist", f"dataset.root={root}",
                        "dataset.val_size=20")  # fmt: skip
    built = build(cfg, torch.device("cpu"))
    data, generator = built.data, torch.Generator().manual_seed(0)
    batch = data.train_batch(data.permutation(generator), 0, 32, generator)
    for x in (batch, data.test):  # binarized, as a Bernoulli VAE's: afresh per batch, once for the test
        assert set(torch.unique(x).tolist()) == {0.0, 1.0}
    model = built.model
    assert model.likelihood.binary_data and model.num_levels == 2
    assert model.nll_offset == pytest.approx(784 * math.log(2))
    # AIS's base: the moments of y = (b + u) / 2 over many dynamic binarizations of the split
    x = built.raw.train.float().div(255).flatten(1)
    draws = torch.cat([(torch.bernoulli(x) + torch.rand_like(x)) / 2 for _ in range(400)])
    assert torch.allclose(model.data_mean.flatten(), draws.mean(0), atol=0.01)
    assert torch.allclose(model.data_std.flatten(), draws.std(0), atol=0.01)
    y = model.dequantize(batch)  # each value in its bit's half of [0, 1]
    assert torch.equal(torch.floor(y * 2), batch)


# -- the replay buffer through SIGKILL and resume ------------------------------------------------

# epochs of about 0.1 s: 2 s of them after the third, when the run is killed
RESUME_RUN = [*EBM_RUN, "model.sgld_steps=40", "trainer.max_epochs=25", "trainer.patience=100",
              "trainer.log_images=false"]  # fmt: skip


def test_the_replay_buffer_survives_sigkill_and_resume_bitwise(tmp_path):
    reference = tmp_path / "reference"
    done = run_vaekit("train", *RESUME_RUN, f"hydra.run.dir={reference}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "run"
    proc = start_vaekit("train", *RESUME_RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for_epoch(run_dir, 3, proc)
    time.sleep(0.2 * float(torch.rand((), generator=torch.Generator().manual_seed(5))))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = torch.load(run_dir / "last.pt", weights_only=True)["fit_state"]["epoch"]
    assert killed_at >= 3 and not (run_dir / "metrics.json").exists()
    resumed = run_vaekit("train", f"resume={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at epoch {killed_at}" in resumed.stdout + resumed.stderr
    a = torch.load(reference / "last.pt", weights_only=True)
    b = torch.load(run_dir / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys() and "replay" in a["model"]
    for name, tensor in a["model"].items():  # the replay buffer and the AIS log Z included
        assert torch.equal(tensor, b["model"][name]), name
    for key, value in a["optimizer"]["state"][0].items():
        assert torch.equal(value, b["optimizer"]["state"][0][key]), key
    metrics_a = json.loads((reference / "metrics.json").read_text())
    metrics_b = json.loads((run_dir / "metrics.json").read_text())
    for key in ("best_epoch", "epochs", "test_iw_nll", "test_log_z", "val_nll"):
        assert metrics_a[key] == metrics_b[key], key
