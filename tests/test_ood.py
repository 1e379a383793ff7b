"""`vaekit evaluate RUN --ood ...` (vaekit/evaluation/ood.py, vaekit/commands/ood.py): AUROC,
AUPRC and FPR at 95% TPR by hand and against scikit-learn, the per-example IW-NLL against the
one-pass estimate, the PNG lengths, a digits VAE telling uniform noise from digits through the
real command, resizing and seeding, model=rbm, and the refusals (one sentence, nothing written)."""

from __future__ import annotations

import io
import json
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error, run_vaekit
from PIL import Image

from vaekit.commands.ood import check_overrides, evaluate_ood, ood_name, refuse_conditional
from vaekit.errors import VaekitError
from vaekit.evaluation.importance import importance_estimates
from vaekit.evaluation.ood import (
    auprc,
    auroc,
    complexity,
    compressed_bits,
    fpr_at_tpr,
    per_example_nll,
    separation,
    typicality,
)
from vaekit.runs import load_run

SCORE_NAMES = ("nll", "typicality", "complexity")
FIGURES = {"auroc", "auprc", "fpr95"}


def write_noise_folder(root: Path, size: int, channels: int = 1, n: int = 80) -> Path:
    """n PNGs of uniform noise, size x size, grayscale (channels=1) or RGB, fixed seed."""
    rng = np.random.default_rng(size + channels)
    root.mkdir(parents=True)
    shape = (size, size) if channels == 1 else (size, size, 3)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / f"noise_{i:03d}.png")
    return root


def folder_overrides(root: Path, size: int, channels: int, cache: Path) -> list[str]:
    """--ood words for an image folder: half of it the test split."""
    return [
        "dataset=image_folder", f"dataset.root={root}", f"dataset.channels={channels}",
        f"dataset.image_size={size}", "dataset.test_fraction=0.5", f"dataset.cache_dir={cache}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's folder: noise folders (8x8 gray, 16x16 gray, 8x8 RGB) and an image cache."""
    tmp = tmp_path_factory.mktemp("ood")
    write_noise_folder(tmp / "noise", 8)
    write_noise_folder(tmp / "noise16", 16)
    write_noise_folder(tmp / "rgb", 8, channels=3, n=20)
    return tmp


@pytest.fixture(scope="module")
def vae_run(trained_run: Path, place: Path) -> Path:
    """A copy of the session's digits VAE run (2-D latent), so the files written here stay here."""
    return Path(shutil.copytree(trained_run, place / "vae_run"))


# ---- the separation metrics ----


def test_metrics_by_hand_with_ties():
    inside, ood = [0.0, 1.0, 1.0, 2.0], [1.0, 2.0, 3.0]
    # pairs (ood, in) won: 1 -> 1 + 2 ties; 2 -> 3 + 1 tie; 3 -> 4: (2 + 3.5 + 4) / 12
    assert auroc(inside, ood) == pytest.approx(9.5 / 12, abs=1e-12)
    # thresholds 3, 2, 1: (recall, precision) (1/3, 1), (2/3, 2/3), (1, 1/2)
    assert auprc(inside, ood) == pytest.approx((1 + 2 / 3 + 1 / 2) / 3, abs=1e-12)
    assert fpr_at_tpr(inside, ood, 0.95) == pytest.approx(3 / 4)  # needs all 3: threshold 1 takes 3 of 4
    assert fpr_at_tpr(inside, ood, 0.6) == pytest.approx(1 / 4)  # 2 of 3 at threshold 2
    assert separation([0, 1], [2, 3]) == {"auroc": 1.0, "auprc": 1.0, "fpr95": 0.0}
    assert auroc([2, 3], [0, 1]) == 0.0 and fpr_at_tpr([2, 3], [0, 1]) == 1.0
    # all tied: chance, one threshold that calls everything OOD
    assert separation([5, 5], [5]) == pytest.approx({"auroc": 0.5, "auprc": 1 / 3, "fpr95": 1.0})
    assert auroc([0.0, math.inf], [math.inf]) == 0.75  # infinite scores rank like any other
    with pytest.raises(ValueError):
        auroc([], [1.0])
    with pytest.raises(ValueError):
        auprc([math.nan], [1.0])


def test_metrics_match_scikit_learn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(6):
        inside = rng.integers(0, 10, size=50 + trial).astype(float)  # many ties within and across
        ood = rng.integers(3, 13, size=30 + 2 * trial).astype(float)
        labels = np.r_[np.zeros(len(inside)), np.ones(len(ood))]
        scores = np.r_[inside, ood]
        assert auroc(inside, ood) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
        assert auprc(inside, ood) == pytest.approx(metrics.average_precision_score(labels, scores), abs=1e-12)
        fpr, tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
        for target in (0.95, 0.5, 1.0):
            assert fpr_at_tpr(inside, ood, target) == pytest.approx(fpr[tpr >= target].min(), abs=1e-12)


# ---- the scores ----


def test_per_example_iw_nll_averages_to_the_one_pass_estimate(vae_run: Path):
    run = load_run(vae_run, "cpu")
    x = run.data.test[:30]
    for chunk in (None, 64 * 17 * 3):  # all draws in one call; 3 pairs per call (draws split)
        torch.manual_seed(5)
        mean = importance_estimates(run.model, x, 16, chunk_elements=chunk, progress=False)["iw_nll"]
        torch.manual_seed(5)
        nll = per_example_nll(run.model, x, 16, batch_size=10**6, chunk_elements=chunk)
        assert nll.shape == (30,) and nll.dtype == torch.float64
        assert float(nll.mean()) == pytest.approx(mean, rel=1e-9)
    torch.manual_seed(5)
    one = per_example_nll(run.model, x[:4], 1, batch_size=2)  # k = 1: -log w of one draw
    torch.manual_seed(5)
    log_w = run.model.log_weights(x[:2], 1)
    assert one[:2].tolist() == pytest.approx((-log_w[0]).double().tolist(), rel=1e-6)


def test_png_lengths_and_the_scores_formulas():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 17, (3, 1, 8, 8), dtype=np.uint8))
    images[0] = 0  # a constant image compresses best
    bits, codec = compressed_bits(images)
    assert codec == "png"
    buffer = io.BytesIO()
    Image.fromarray(images[1, 0].numpy()).save(buffer, format="PNG", compress_level=9)
    assert bits[1] == 8 * len(buffer.getvalue())
    assert bits[0] < bits[1] and bits[0] < bits[2]
    rgb_bits, _ = compressed_bits(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    assert rgb_bits[0] == rgb_bits[1] > 0
    two, codec = compressed_bits(torch.zeros(1, 2, 4, 4, dtype=torch.uint8))  # no PNG mode: deflate
    assert codec == "zlib" and two[0] > 0
    nll = torch.tensor([10.0, 30.0], dtype=torch.float64)
    assert typicality(nll, 20.0).tolist() == [10.0, 10.0]
    assert complexity(nll, torch.tensor([8.0, 100.0])).tolist() == pytest.approx(
        [10 / math.log(2) - 8, 30 / math.log(2) - 100]
    )


# ---- through the command ----


def test_a_digits_vae_scores_uniform_noise_out_of_distribution(vae_run: Path, place: Path):
    words = folder_overrides(place / "noise", 8, 1, place / "cache")
    done = run_vaekit("evaluate", str(vae_run), "--k", "50", "--seed", "1", "--ood", *words, cwd=place)
    assert done.returncode == 0, done.stderr
    assert "| nll        |" in done.stdout and "FPR@95TPR" in done.stdout
    result = json.loads((vae_run / "ood_image_folder_noise.json").read_text())
    assert set(result["scores"]) == set(SCORE_NAMES)
    assert all(set(result["scores"][name]) == FIGURES for name in SCORE_NAMES)
    assert result["scores"]["nll"]["auroc"] > 0.95
    assert result["scores"]["nll"]["fpr95"] < 0.05
    assert result["score"] == "iw_nll" and result["k"] == 50 and result["seed"] == 1
    inside, ood = result["in_distribution"], result["ood"]
    assert inside["dataset"] == "digits" and inside["num_examples"] == 447
    assert ood["num_examples"] == 40 and ood["levels_from"] == 256 and ood["resized_from"] is None
    assert ood["mean_nll"] > inside["mean_nll"]
    assert inside["mean_bpd"] == pytest.approx(inside["mean_nll"] / (64 * math.log(2)))
    assert result["typical_examples"] == 1000 and result["compressor"] == "png"
    # the run's own test NLL is typical: the training mean lies near it (same model, same data)
    assert abs(result["typical_nll"] - inside["mean_nll"]) < 0.2 * inside["mean_nll"]
    png = Path(result["histogram"])
    assert png == vae_run / "ood_image_folder_noise.png" and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {vae_run / 'ood_image_folder_noise.json'} and {png}" in done.stdout
    print({name: round(result["scores"][name]["auroc"], 4) for name in SCORE_NAMES})


def test_other_sizes_are_resized_and_the_same_seed_gives_the_same_file(vae_run: Path, place: Path):
    words = folder_overrides(place / "noise16", 16, 1, place / "cache")
    first = evaluate_ood(vae_run, words, k=10, seed=2, device="cpu", progress=False, typical_examples=100)
    path = Path(first["path"])
    assert path.name == "ood_image_folder_noise16.json"
    assert first["ood"]["resized_from"] == [16, 16] and first["typical_examples"] == 100
    before = path.read_bytes()
    again = evaluate_ood(vae_run, words, k=10, seed=2, device="cpu", progress=False, typical_examples=100)
    assert path.read_bytes() == before and again["scores"] == first["scores"]
    other = evaluate_ood(vae_run, words, k=10, seed=3, device="cpu", progress=False, typical_examples=100)
    assert other["in_distribution"]["mean_nll"] != first["in_distribution"]["mean_nll"]
    assert other["scores"]["nll"]["auroc"] > 0.95
    val = evaluate_ood(vae_run, words, k=5, split="val", device="cpu", progress=False, typical_examples=50)
    assert Path(val["path"]).name == "ood_image_folder_noise16_val.json"
    assert val["in_distribution"]["num_examples"] == 350


@pytest.mark.parametrize("case", ["cannot load", "channels differ"])
def test_refusals_through_the_command_write_nothing(vae_run: Path, place: Path, case: str):
    if case == "cannot load":
        (place / "empty").mkdir(exist_ok=True)
        words, said = ["dataset=mnist", f"dataset.root={place / 'empty'}"], "MNIST not found"
    else:
        words = folder_overrides(place / "rgb", 8, 3, place / "cache")
        said = "3 channel(s) but the run's have 1"
    before = sorted(vae_run.glob("ood_*"))
    done = run_vaekit("evaluate", str(vae_run), "--k", "5", "--ood", *words, cwd=place)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vaekit: error: --ood {words[0]} ") and said in lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert sorted(vae_run.glob("ood_*")) == before


def test_bad_overrides_are_one_sentence(vae_run: Path, capsys: pytest.CaptureFixture[str]):
    line = cli_error(capsys, "evaluate", str(vae_run), "--ood", "dataset=fashion")
    assert "Could not find 'dataset/fashion' (choose from: " in line and "fashion_mnist" in line
    line = cli_error(capsys, "evaluate", str(vae_run), "--ood", "dataset.root=data")
    assert "the default dataset, digits: choose one with dataset=NAME" in line
    line = cli_error(capsys, "evaluate", str(vae_run), "--ood", "dataset=mnist", "model=rbm")
    assert line.endswith("--ood takes dataset overrides only (dataset=NAME, dataset.KEY=VALUE, "
                         "data.limit_eval=N), not model=rbm.")  # fmt: skip
    assert "not 'mnist'" in cli_error(capsys, "evaluate", str(vae_run), "--ood", "mnist")
    assert check_overrides(["dataset=mnist", "+dataset.x=1", "data.limit_eval=5"])[2] == "data.limit_eval=5"
    with pytest.raises(VaekitError, match="conditional VAE"):
        refuse_conditional(types.SimpleNamespace(conditional=True))


def test_names_of_the_files():
    raw = types.SimpleNamespace(name="image_folder")
    assert ood_name(raw, ["dataset=image_folder", "dataset.root=/data/my pics/"]) == "image_folder_my_pics"
    assert ood_name(types.SimpleNamespace(name="mnist"), ["dataset=mnist", "dataset.root=mnist"]) == "mnist"
    assert ood_name(types.SimpleNamespace(name="fashion_mnist"), ["dataset=fashion_mnist"]) == "fashion_mnist"


def test_an_rbm_run_scores_noise_by_its_free_energy(place: Path):
    run = place / "rbm_run"
    settings = ["model=rbm", "model.hidden=16", "trainer.max_epochs=2", "eval.ais_chains=20",
                "eval.ais_betas=100", "eval.val_ais_chains=4", "eval.val_ais_betas=50",
                "trainer.progress=false"]  # fmt: skip
    done = run_vaekit("train", *settings, f"hydra.run.dir={run}", cwd=place)
    assert done.returncode == 0, done.stderr
    words = folder_overrides(place / "noise", 8, 1, place / "cache")
    done = run_vaekit("evaluate", str(run), "--ood", *words, cwd=place)
    assert done.returncode == 0, done.stderr
    result = json.loads((run / "ood_image_folder_noise.json").read_text())
    assert result["score"] == "free_energy" and result["k"] is None
    figures = [result["scores"][name][key] for name in SCORE_NAMES for key in FIGURES]
    assert all(isinstance(value, float) and math.isfinite(value) for value in figures)
    assert result["scores"]["nll"]["auroc"] > 0.95
    assert math.isfinite(result["in_distribution"]["mean_nll"])
    assert (run / "ood_image_folder_noise.png").stat().st_size > 1000
