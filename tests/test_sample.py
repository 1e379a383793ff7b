"""`vaekit sample`: every figure opened and checked, temperature, paths in latent space, refusals."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error, run_vaekit
from omegaconf import OmegaConf
from PIL import Image
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    Normal,
    TransformedDistribution,
)
from torch.distributions.transforms import ExpTransform

from vaekit import cli
from vaekit.commands.sample import manifold_axes, sample_figure, tempered_prior_sample
from vaekit.errors import VaekitError
from vaekit.latents import lerp, slerp
from vaekit.runs import load_run
from vaekit.training.checkpoint import CHECKPOINT_FORMAT

TILE = 8 * 4 + 2  # 8x8 digits are enlarged 4x; make_grid pads 2 pixels


def grid_side(tiles: int) -> int:
    """Pixels along a grid side of `tiles` images."""
    return tiles * TILE + 2


@pytest.fixture
def run_dir(trained_run: Path) -> Path:
    """The session's shared tiny digits run (2-D latent)."""
    return trained_run


def open_png(path: Path) -> np.ndarray:
    """The PNG's pixels; fails when it is blank (a single colour)."""
    assert path.is_file(), path
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    assert pixels.std() > 0, f"{path} is blank"
    return pixels


def test_sample_command_writes_a_grid_of_prior_samples(run_dir: Path):
    done = run_vaekit("sample", str(run_dir), "--n", "16", "--seed", "1", cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr
    out = run_dir / "samples.png"
    assert f"wrote {out}" in done.stdout
    assert open_png(out).shape == (grid_side(2), grid_side(8), 3)  # 16 samples, 8 per row


@pytest.mark.parametrize(
    ("argv", "name", "shape"),
    [
        ([], "samples.png", (grid_side(8), grid_side(8))),  # 64 samples
        (["--n", "10", "--temperature", "0.5"], "cold.png", (grid_side(2), grid_side(8))),
        (["--reconstruct", "--n", "12"], "reconstruct.png", (grid_side(4), grid_side(8))),  # 2 x (orig, rec)
        (["--interpolate", "--n", "3", "--steps", "5"], "interpolate.png", (grid_side(3), grid_side(7))),
        (["--manifold", "--steps", "6"], "manifold.png", (grid_side(6), grid_side(6))),
        (["--scatter"], "scatter.png", (600, 650)),
    ],
)
def test_every_figure_is_a_non_blank_png_of_the_expected_size(run_dir, tmp_path, capsys, argv, name, shape):
    out = tmp_path / "figures" / name
    cli.main(["sample", str(run_dir), *argv, "--out", str(out), "--device", "cpu"])
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert open_png(out).shape[:2] == shape


def test_figures_follow_the_seed_and_default_to_the_run_directory(run_dir: Path):
    first = open_png(sample_figure(run_dir, "interpolate", n=2, steps=4, seed=5, device="cpu"))
    assert (run_dir / "interpolate.png").is_file()
    again = open_png(sample_figure(run_dir, "interpolate", n=2, steps=4, seed=5, device="cpu"))
    other = open_png(sample_figure(run_dir, "interpolate", n=2, steps=4, seed=6, device="cpu"))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_interpolation_rows_start_and_end_with_the_test_images(run_dir: Path):
    from vaekit.commands.sample import interpolations

    run = load_run(run_dir, "cpu")
    tiles = interpolations(run, rows=2, steps=3, seed=0).view(2, 5, *run.data.shape)
    test = run.data.test.flatten(1)
    for row in tiles:
        for end in (row[0], row[-1]):
            assert (test == end.flatten()).all(1).any()  # an actual test image


def test_tempered_gaussian_sample_is_scaled_around_the_mean():
    torch.manual_seed(0)
    p_z = Independent(Normal(torch.tensor([1.0, -2.0]), torch.tensor([1.0, 3.0])), 1)
    z = tempered_prior_sample(p_z, 200000, 0.5)
    torch.testing.assert_close(z.mean(0), torch.tensor([1.0, -2.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([0.5, 1.5]), atol=0.02, rtol=0)


def test_tempered_mixture_sample_is_scaled_around_its_component():
    torch.manual_seed(0)
    means = torch.tensor([[-10.0, 0.0], [10.0, 0.0]])
    p_z = MixtureSameFamily(Categorical(torch.tensor([0.25, 0.75])), Independent(Normal(means, 2.0), 1))
    z = tempered_prior_sample(p_z, 100000, 0.5)
    right = z[:, 0] > 0
    assert abs(right.float().mean().item() - 0.75) < 0.01  # mixing weights unchanged
    torch.testing.assert_close(z[right].std(0), torch.tensor([1.0, 1.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(z[~right].mean(0), means[0], atol=0.03, rtol=0)


def test_temperature_is_refused_where_it_has_no_meaning():
    flow_like = TransformedDistribution(Independent(Normal(torch.zeros(2), 1.0), 1), [ExpTransform()])
    assert tempered_prior_sample(flow_like, 3, 1.0).shape == (3, 2)  # T = 1: plain sampling
    with pytest.raises(VaekitError, match="Gaussian and Gaussian-mixture priors only"):
        tempered_prior_sample(flow_like, 3, 0.7)
    with pytest.raises(VaekitError, match="must be a positive number"):
        tempered_prior_sample(flow_like, 3, 0.0)


def test_lerp_and_slerp_paths():
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, -0.5])
    path = lerp(a, b, 5)
    torch.testing.assert_close(path[[0, -1]], torch.stack([a, b]))
    torch.testing.assert_close(path[2], (a + b) / 2)
    arc = slerp(a, b, 7)
    torch.testing.assert_close(arc.norm(dim=1), torch.ones(7))  # on the sphere
    torch.testing.assert_close(arc[[0, -1]], torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]))
    angles = torch.arccos((arc[1:] * arc[:-1]).sum(1).clamp(-1, 1))
    torch.testing.assert_close(angles, torch.full((6,), math.pi / 2 / 6))  # constant speed
    same = slerp(a, 2 * a, 3)  # aligned: no division by sin(0)
    assert torch.isfinite(same).all()


def test_manifold_grid_spans_gaussian_quantiles():
    axes = manifold_axes(Independent(Normal(torch.zeros(2), torch.tensor([1.0, 2.0])), 1), 5)
    torch.testing.assert_close(axes[:, 0], torch.tensor([-1.6449, -3.2897]), atol=1e-3, rtol=0)
    torch.testing.assert_close(axes[:, 2], torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(axes[:, -1], -axes[:, 0])


@pytest.fixture
def three_d_run(run_dir: Path, tmp_path: Path) -> Path:
    """A run folder whose best.pt holds an (untrained) model with a 3-D latent."""
    from vaekit.build import build_dataset, build_model

    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    config = OmegaConf.create(checkpoint["config"])
    for group in ("model", "prior", "posterior"):
        config[group].latent_dim = 3
    model = build_model(config, build_dataset(config))
    folder = tmp_path / "three_d"
    shutil.copytree(run_dir / ".hydra", folder / ".hydra")
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": OmegaConf.to_container(config),
        "model": model.state_dict(),
        "fit_state": {"epoch": 0},
    }
    torch.save(state, folder / "best.pt")
    return folder


def test_plane_figures_refuse_other_latent_sizes(three_d_run: Path, capsys):
    line = cli_error(capsys, "sample", str(three_d_run), "--manifold")
    assert "--manifold needs a 2-D latent, but this run has model.latent_dim=3" in line
    assert "--scatter needs a 2-D latent" in cli_error(capsys, "sample", str(three_d_run), "--scatter")
    cli.main(["sample", str(three_d_run), "--n", "4"])  # other figures work for any latent size
    assert open_png(three_d_run / "samples.png").shape[:2] == (grid_side(1), grid_side(4))


def test_bad_sample_arguments_give_one_sentence(run_dir: Path, tmp_path: Path, capsys):
    assert "--temperature must be a positive number" in cli_error(
        capsys, "sample", str(run_dir), "--temperature", "-1"
    )
    assert "--temperature applies to prior samples only" in cli_error(
        capsys, "sample", str(run_dir), "--manifold", "--temperature", "0.5"
    )
    assert "--n must be at least 1" in cli_error(capsys, "sample", str(run_dir), "--n", "0")
    assert "--out must name a .png file" in cli_error(capsys, "sample", str(run_dir), "--out", "x.jpg")
    assert "is not a vaekit run directory" in cli_error(capsys, "sample", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:  # two modes at once: argparse's usage error
        cli.main(["sample", str(run_dir), "--manifold", "--scatter"])
    assert exit_info.value.code == 2
