"""model=rbm through the trainer and the commands (vaekit/image_rbm.py): the dequantized NLL
bound against exact enumeration, exact resume of persistent chains, AIS test numbers in the
keys VAEs use, and the VAE-only settings refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import read_events, run_vaekit, write_fake_mnist

from vaekit.evaluation.ais import rbm_estimates
from vaekit.image_rbm import ImageRBM
from vaekit.likelihoods import BernoulliLikelihood, CategoricalLikelihood
from vaekit.training.checkpoint import load_checkpoint

RBM_RUN = ["model=rbm", "model.hidden=16", "trainer.progress=false", "eval.ais_chains=50",
           "eval.ais_betas=300", "eval.val_ais_chains=8", "eval.val_ais_betas=100",
           "model.sample_steps=20"]  # fmt: skip


def tiny_gaussian_rbm(levels: int = 4) -> ImageRBM:
    """A Gaussian-visible ImageRBM on 1x1x2 images of `levels` levels, 3 hidden units, random
    weights of scale 1 (so the bound is not trivially tight)."""
    torch.manual_seed(0)
    train = torch.randint(0, levels, (50, 1, 1, 2), dtype=torch.uint8)
    model = ImageRBM((1, 1, 2), CategoricalLikelihood(levels), levels, train, hidden=3)
    with torch.no_grad():
        model.rbm.weight.normal_(0, 1)
        model.rbm.visible_bias.normal_(0, 0.5)
        model.rbm.hidden_bias.normal_(0, 0.5)
    return model


def exact_discrete_nll(model: ImageRBM, x_int: tuple[int, int], grid: int = 200) -> float:
    """-log P(x_int) = -log of the density of y = (x_int + u) / L integrated over the cell,
    by the midpoint rule on a grid x grid, with log Z by enumeration."""
    levels = model.num_levels
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    y0, y1 = torch.meshgrid((x_int[0] + u) / levels, (x_int[1] + u) / levels, indexing="ij")
    y = torch.stack([y0.reshape(-1), y1.reshape(-1)], 1)
    v = ((y - model.data_mean.double()) / model.data_std.double()).float()
    log_density_y = -model.rbm.free_energy(v).double() - model.rbm.log_z_exact().double()
    log_density_y = log_density_y - model.data_std.double().log().sum()
    cell = (1.0 / (levels * grid)) ** 2  # area of one grid square
    return -float(torch.logsumexp(log_density_y.detach(), 0) + math.log(cell))


def test_the_dequantized_nll_bounds_the_discrete_nll_from_above():
    model = tiny_gaussian_rbm()
    gaps = []
    for x_int in [(0, 0), (1, 3), (2, 2), (3, 0)]:
        x = torch.tensor(x_int, dtype=torch.float32).view(1, 1, 1, 2) / (model.num_levels - 1)
        torch.manual_seed(1)
        free = torch.stack([model.free_energy(x) for _ in range(4000)]).double().mean()  # E_u[F(v)]
        bound = float(free.detach()) + float(model.rbm.log_z_exact().detach()) + model.nll_offset
        exact = exact_discrete_nll(model, x_int)
        gaps.append(bound - exact)
    assert all(gap > -0.02 for gap in gaps), gaps  # a bound (up to the Monte Carlo error of E_u)
    assert max(gaps) < 1.0, gaps  # and not a vacuous one


def test_rbm_estimates_match_exact_enumeration_on_a_tiny_binary_model():
    torch.manual_seed(0)
    train = torch.randint(0, 2, (200, 1, 3, 4), dtype=torch.uint8)
    model = ImageRBM((1, 3, 4), BernoulliLikelihood(), 2, train, hidden=6)
    with torch.no_grad():
        model.rbm.weight.normal_(0, 1)
    x = train[:100].float()
    torch.manual_seed(2)
    estimates = rbm_estimates(model, x, num_chains=500, num_betas=500)
    with torch.no_grad():
        exact_nll = float(-model.rbm.log_prob_exact(x.reshape(100, -1)).mean())
        exact_log_z = float(model.rbm.log_z_exact())
    assert estimates["log_z"] == pytest.approx(exact_log_z, abs=0.05)
    assert estimates["nll"] == pytest.approx(exact_nll, abs=0.05)
    assert model.nll_offset == 0.0


def test_an_rbm_trains_with_pcd_and_reports_ais_numbers_in_the_vaekit_keys(tmp_path):
    run = tmp_path / "run"
    done = run_vaekit("train", *RBM_RUN, "model.persistent=true", "trainer.max_epochs=3",
                      f"hydra.run.dir={run}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_estimator"] == "ais" and metrics["stopped_on"] == "nll"
    assert 0 < metrics["test_iw_nll"] < 64 * math.log(17) + 1  # better than uniform over 17 levels, roughly
    assert metrics["test_iw_nll_stderr"] > 0 and "test_nelbo" not in metrics
    assert metrics["test_bpd"] == pytest.approx(metrics["test_iw_nll"] / (64 * math.log(2)))
    assert "test NLL (AIS, 50 chains)" in done.stdout
    scalars, images = read_events(run)
    assert {"train/free_energy", "train/cd_gap", "val/nll", "val/log_z"} <= set(scalars)
    assert [step for step, _ in scalars["val/nll"]] == [1, 2, 3]
    assert images  # sample and reconstruction grids
    chains = load_checkpoint(run / "last.pt")["model"]["rbm.chains"]
    assert chains.shape == (100, 64)


def test_persistent_chains_resume_exactly(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = [*RBM_RUN, "model.persistent=true", "eval.ais_chains=10", "eval.ais_betas=20",
              "eval.val_ais_betas=20", "trainer.log_images=false"]  # fmt: skip
    done = run_vaekit("train", *common, "trainer.max_epochs=3", f"hydra.run.dir={whole}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    first = run_vaekit("train", *common, "trainer.max_epochs=2", f"hydra.run.dir={split}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_vaekit("train", f"resume={split}", "trainer.max_epochs=3", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    a, b = load_checkpoint(whole / "last.pt")["model"], load_checkpoint(split / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)  # chains included
    assert json.loads((whole / "metrics.json").read_text())["test_iw_nll"] == (
        json.loads((split / "metrics.json").read_text())["test_iw_nll"]
    )


def test_binary_mnist_gets_bernoulli_visible_units(tmp_path):
    write_fake_mnist(tmp_path / "data")
    run = tmp_path / "run"
    done = run_vaekit("train", *RBM_RUN, "dataset=mnist", f"dataset.root={tmp_path / 'data'}",
                      "dataset.val_size=20", "trainer.max_epochs=1", f"hydra.run.dir={run}",
                      cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    state = load_checkpoint(run / "best.pt")["model"]
    assert "rbm.log_sigma" not in state  # Bernoulli visible units: no sigma
    assert json.loads((run / "metrics.json").read_text())["test_iw_nll"] < 784 * math.log(2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prior=mog"], "model=rbm has no prior to choose: drop prior=mog."),
        (["objective=iwae"], "model=rbm has no objective to choose: drop objective=iwae."),
        (["trainer.beta=4"], "trainer.beta weights a KL term, which model=rbm does not have"),
        (["model.cd_k=0"], "model.cd_k must be at least 1 Gibbs step, not 0."),
    ],
)
def test_vae_only_settings_are_refused_with_model_rbm(tmp_path, overrides, message):
    done = run_vaekit("train", *RBM_RUN, *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 1
    assert message in done.stderr.strip().splitlines()[-1] and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "last.pt").exists()  # nothing trained


def test_langevin_samples_an_rbm_and_a_vae_posterior_and_refuses_binary_units(tmp_path, trained_run):
    run = tmp_path / "run"
    assert run_vaekit("train", *RBM_RUN, "trainer.max_epochs=1", "trainer.log_images=false",
                      f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0  # fmt: skip
    langevin = ["--sampler", "langevin"]
    done = run_vaekit("sample", str(run), *langevin, "--steps", "50", "--mala", "--n", "16", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (run / "langevin.png").stat().st_size > 0
    from_image = run_vaekit("sample", str(trained_run), *langevin, "--from", "2", "--steps", "20",
                            "--out", str(tmp_path / "posterior.png"), cwd=tmp_path)  # fmt: skip
    assert from_image.returncode == 0, from_image.stderr
    refused = {
        "--from samples a VAE's latent posterior": ["sample", str(run), *langevin, "--from", "1"],
        "add --from INDEX": ["sample", str(trained_run), *langevin],
        "add --sampler langevin": ["sample", str(trained_run), "--from", "1"],
    }
    for message, args in refused.items():
        done = run_vaekit(*args, cwd=tmp_path)
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_bernoulli_rbm_refuses_langevin(tmp_path):
    from vaekit.commands.langevin import rbm_langevin_images
    from vaekit.errors import VaekitError

    train = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    model = ImageRBM((1, 2, 2), BernoulliLikelihood(), 2, train, hidden=3)
    with pytest.raises(VaekitError, match="sample it with Gibbs steps"):
        rbm_langevin_images(model, 4, 10, 0.01, mala=False)
