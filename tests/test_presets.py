"""Experiment and debug presets: every one composes to its paper's (or its own) settings and
trains for a few steps on tiny data; the subset settings, the overfit check, and one sentence
for a misspelled preset or missing data."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_error, compose_train, read_events, write_fake_mnist
from omegaconf import OmegaConf
from test_cifar import write_cifar

from vaekit.build import build, check_settings
from vaekit.commands.train import CONFIG_DIR, train
from vaekit.data import load_digits
from vaekit.data.memory import split_checksum
from vaekit.data.splits import first_examples
from vaekit.errors import VaekitError
from vaekit.runs import load_run
from vaekit.training.overfit import OverfitCheck

EXPERIMENTS = sorted(path.stem for path in (CONFIG_DIR / "experiment").glob("*.yaml"))
DEBUG_PRESETS = sorted(path.stem for path in (CONFIG_DIR / "debug").glob("*.yaml"))
MNIST_DATA = REPO.parent / "shared" / "data"  # the real MNIST, where this machine has it

# What each experiment must set: the papers' numbers (see each file's header). Class names
# are compared with the end of `_target_`.
EXPECTED = {
    "vampprior_mnist": {
        "prior._target_": "VampPrior", "prior.num_components": 500, "prior.init": "random",
        "model.latent_dim": 40, "net.hidden_dim": 300, "optimizer.lr": 5e-4,
        "trainer.batch_size": 100, "trainer.patience": 50, "trainer.kl_warmup_epochs": 100,
    },
    "sylvester_mnist": {
        "posterior._target_": "SylvesterPosterior", "posterior.num_flows": 16,
        "posterior.kind": "orthogonal", "posterior.num_ortho_vecs": 32, "model.latent_dim": 64,
        "net._target_": "ConvNets", "optimizer._target_": "Adamax", "optimizer.lr": 5e-4,
        "trainer.batch_size": 100, "trainer.patience": 100, "trainer.kl_warmup_epochs": 100,
    },
    "iaf_mnist": {
        "posterior._target_": "IAFPosterior", "posterior.num_flows": 16, "posterior.made_hidden": 320,
        "model.latent_dim": 64, "net._target_": "ConvNets", "optimizer.lr": 5e-4,
        "trainer.kl_warmup_epochs": 100,
    },
    "svae_mnist": {
        "prior._target_": "UniformSpherePrior", "posterior._target_": "VonMisesFisherPosterior",
        "model.latent_dim": 10, "optimizer.lr": 1e-3, "trainer.batch_size": 64,
    },
    "hvae_mnist": {
        "model._target_": "TwoLevelVAE", "model.latent_dims": [100, 50], "net.hidden_dim": 200,
        "trainer.batch_size": 20,
    },
    "lvae_mnist": {
        "model._target_": "TopDownVAE", "model.levels": 5, "model.latent_dims": [64, 32, 16, 8, 4],
        "optimizer.lr": 2e-3, "trainer.batch_size": 256, "trainer.kl_warmup_epochs": 200,
    },
    "iaf_cifar10": {
        "likelihood._target_": "DiscretizedLogisticLikelihood", "posterior._target_": "IAFPosterior",
        "net._target_": "ResNets", "net.stages": 3, "model.latent_dim": 128,
    },
    "nvae_cifar10": {
        "likelihood._target_": "DiscretizedMixtureLikelihood", "model._target_": "TopDownVAE",
        "model.latent_dims": [64, 32], "scheduler.name": "cosine", "scheduler.min_lr_factor": 0.01,
        "optimizer.lr": 1e-2, "trainer.patience": 400, "trainer.kl_warmup_epochs": 120,
    },
}  # fmt: skip

TINY = ["trainer.max_epochs=1", "eval.iw_samples=4", "eval.nelbo_samples=2", "trainer.progress=false"]
TINY += ["trainer.log_images=false", "net.hidden_dim=32"]
# Sizes cut down so that each preset trains in about a second; everything else is the preset's.
SHRINK = {
    "vampprior_mnist": ["prior.num_components=10", "model.latent_dim=4"],
    "sylvester_mnist": ["model.latent_dim=8", "posterior.num_ortho_vecs=4", "posterior.num_flows=2"],
    "iaf_mnist": ["model.latent_dim=8", "posterior.num_flows=2", "posterior.made_hidden=16"],
    "svae_mnist": [],
    "hvae_mnist": ["model.latent_dims=[8,4]"],
    "lvae_mnist": ["model.latent_dims=[8,4,4,2,2]"],
    "iaf_cifar10": ["model.latent_dim=8", "posterior.num_flows=2", "posterior.made_hidden=16"],
    "nvae_cifar10": ["model.latent_dims=[8,4]", "likelihood.num_mixtures=2"],
}
CONV = ["net.channels=8"]
RESNET = ["net.channels=8", "net.stages=2", "net.blocks_per_stage=1"]


def test_every_experiment_is_listed_here():
    assert EXPERIMENTS == sorted(EXPECTED) == sorted(SHRINK)
    assert {"fast", "overfit"} <= set(DEBUG_PRESETS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_experiment_composes_to_its_papers_settings(name: str):
    cfg = compose_train(f"+experiment={name}")
    for key, value in EXPECTED[name].items():
        found = OmegaConf.select(cfg, key)
        assert found.endswith(value) if key.endswith("_target_") else found == value, (key, found)
    assert cfg.dataset.name == name.split("_")[-1]
    assert cfg.eval.iw_samples >= 1000 and cfg.trainer.max_epochs >= 400
    check_settings(cfg)


@pytest.mark.parametrize("name", DEBUG_PRESETS)
def test_each_debug_preset_composes(name: str):
    check_settings(compose_train(f"+debug={name}"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_experiment_trains_a_few_steps(name: str, tmp_path: Path):
    if name.endswith("mnist"):
        write_fake_mnist(tmp_path / "data")  # 100 train, 20 val, 40 test
        data = ["dataset.val_size=20", "trainer.batch_size=25", *(CONV if "conv" in name else [])]
    else:
        write_cifar(tmp_path / "data", n=12)  # 48 train, 12 val, 12 test
        data = ["dataset.val_size=12", "trainer.batch_size=12", *RESNET]
    if name in ("sylvester_mnist", "iaf_mnist"):
        data += CONV
    cfg = compose_train(
        f"+experiment={name}", f"dataset.root={tmp_path / 'data'}", *data, *TINY, *SHRINK[name]
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = train(cfg, run_dir)
    assert metrics["status"] == "finished" and metrics["epochs"] == 1
    assert 0 < metrics["test_nelbo"] < 1e5 and metrics["test_iw_nll"] <= metrics["test_nelbo"] + 1e-3
    assert (run_dir / "best.pt").is_file()


def test_a_later_preset_wins_and_the_command_line_wins_over_both():
    cfg = compose_train("+experiment=vampprior_mnist", "+debug=fast", "prior=mog", "model.latent_dim=8")
    assert cfg.trainer.max_epochs == 2 and cfg.eval.iw_samples == 10 and cfg.data.limit_train == 2000
    assert cfg.prior._target_.endswith("MixtureOfGaussiansPrior") and cfg.model.latent_dim == 8
    assert cfg.trainer.batch_size == 100  # what fast leaves alone stays the experiment's
    cfg = compose_train("+debug=fast", "+experiment=vampprior_mnist")
    assert cfg.trainer.max_epochs == 2000 and cfg.eval.iw_samples == 5000


def test_debug_fast_trains_two_epochs_on_the_first_examples(tmp_path: Path):
    cfg = compose_train("+debug=fast")
    assert OmegaConf.to_container(cfg.data)["limit_train"] == 2000 and cfg.data.limit_eval == 500
    assert cfg.trainer.max_epochs == 2 and not cfg.trainer.log_images and not cfg.trainer.progress
    assert cfg.eval.iw_samples == 10 and cfg.eval.nelbo_samples == 2
    # digits is smaller than the subset: cut further to see the cut
    cfg = compose_train("+debug=fast", "data.limit_train=100", "data.limit_eval=50", "net.hidden_dim=32")
    metrics = train(cfg, tmp_path)
    digits = load_digits()
    assert metrics["epochs"] == 2 and metrics["iw_samples"] == 10 and metrics["nelbo_samples"] == 2
    assert metrics["data_checksums"] == {
        "train": split_checksum(digits.train[:100]),
        "val": split_checksum(digits.val[:50]),
        "test": split_checksum(digits.test[:50]),
    }
    scalars, images = read_events(tmp_path)
    assert images == set() and [step for step, _ in scalars["val/nelbo"]] == [1, 2]


def test_debug_fast_runs_an_ebms_validation_and_test_ais_short(tmp_path: Path):
    cfg = compose_train("+debug=fast", "model=ebm", "model.sgld_steps=2", "data.limit_train=100",
                        "data.limit_eval=50", "net.hidden_dim=32")  # fmt: skip
    metrics = train(cfg, tmp_path)
    assert (metrics["test_ais_chains"], metrics["test_ais_betas"]) == (10, 200)
    assert math.isfinite(metrics["test_iw_nll"]) and metrics["test_log_z_stderr"] > 0
    assert (cfg.eval.val_ais_chains, cfg.eval.val_ais_betas) == (4, 100)
    scalars, _ = read_events(tmp_path)
    assert [step for step, _ in scalars["val/nll"]] == [1, 2]


def test_first_examples_cuts_each_split_and_keeps_labels_aligned():
    digits = load_digits()
    cut = first_examples(digits, 10, 5)
    assert [cut.images(s).shape[0] for s in ("train", "val", "test")] == [10, 5, 5]
    assert (cut.train == digits.train[:10]).all() and (cut.test_labels == digits.test_labels[:5]).all()
    whole = first_examples(digits, 10**6, None)
    assert whole.train.shape == digits.train.shape and whole.val.shape == digits.val.shape
    assert first_examples(digits, None, None) is digits


@pytest.mark.parametrize("setting", ["data.limit_train=0", "data.limit_eval=-3"])
def test_a_limit_below_one_is_one_sentence(setting: str):
    key, value = setting.split("=")
    message = rf"^{key} must be at least 1 \(or null: the whole split\), not {value}\.$"
    with pytest.raises(VaekitError, match=message):
        check_settings(compose_train(setting))


def test_debug_overfit_drives_the_training_nelbo_down(tmp_path: Path, caplog):
    cfg = compose_train("+debug=overfit", "trainer.batch_size=32", "trainer.max_epochs=60",
                        "net.hidden_dim=64")
    assert cfg.data.limit_train == 32 and cfg.trainer.patience == 60 and cfg.trainer.overfit_check
    with caplog.at_level(logging.INFO, logger="vaekit"):
        metrics = train(cfg, tmp_path / "fit")
    start, end = metrics["overfit_nelbo_start"], metrics["overfit_nelbo_end"]
    assert metrics["epochs"] == 60 and metrics["status"] == "finished"  # no early stopping
    assert end < 0.75 * start, (start, end)  # 32 digits of 64 pixels, learned by heart
    line = next(r for r in caplog.records if r.getMessage().startswith("overfit check"))
    assert line.levelno == logging.INFO and f"{start:.2f} -> {end:.2f} nats" in line.getMessage()


def test_the_overfit_check_warns_when_nothing_is_learned(tmp_path: Path, caplog):
    write_fake_mnist(tmp_path)  # Bernoulli: the check binarizes the training split once, seeded
    cfg = compose_train("dataset=mnist", f"dataset.root={tmp_path}", "dataset.val_size=20")
    built = build(cfg, torch.device("cpu"))
    check = OverfitCheck(built.model, built.raw, built.device, batch_size=64)
    assert set(check.x.unique().tolist()) == {0.0, 1.0}
    with caplog.at_level(logging.INFO, logger="vaekit"):
        fields = check.finish(epochs=0)  # no step taken: the same data, the same draws of z
    assert fields["overfit_nelbo_end"] == fields["overfit_nelbo_start"] == check.start
    line = next(r for r in caplog.records if r.getMessage().startswith("overfit check"))
    assert line.levelno == logging.WARNING and "did not fall" in line.getMessage()


def test_a_misspelled_preset_is_one_sentence_listing_the_presets(capsys):
    line = cli_error(capsys, "train", "+experiment=vampprior_mnsit")
    assert "+experiment=vampprior_mnsit names no experiment preset: choose from" in line
    assert all(name in line for name in EXPERIMENTS)
    line = cli_error(capsys, "train", "-m", "+debug=fast,fats")
    assert "+debug=fats names no debug preset" in line and "overfit" in line
    line = cli_error(capsys, "train", "experiment=svae_mnist")
    assert line.endswith("with a plus: +experiment=svae_mnist.")


def test_an_mnist_preset_without_its_files_says_which_files_where(tmp_path: Path):
    cfg = compose_train("+experiment=vampprior_mnist", f"dataset.root={tmp_path / 'nothing'}")
    files = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
    where = tmp_path / "nothing" / "MNIST" / "raw"
    with pytest.raises(VaekitError, match=rf"^MNIST not found: put {files} into {where}, set dataset.root"):
        train(cfg, tmp_path)
    assert not (tmp_path / "best.pt").exists()


@pytest.mark.skipif(not (MNIST_DATA / "MNIST" / "raw").is_dir(), reason="no MNIST under ../shared/data")
def test_debug_fast_on_the_real_mnist(tmp_path: Path):
    cfg = compose_train("dataset=mnist", f"dataset.root={MNIST_DATA}", "+debug=fast")
    metrics = train(cfg, tmp_path)  # about a second here; README gives the whole command's time
    assert metrics["epochs"] == 2 and metrics["status"] == "finished"
    assert 80 < metrics["test_iw_nll"] < 300  # 2 epochs on 2000 images: far from trained
    run = load_run(tmp_path, "cpu")
    assert run.raw.train.shape[0] == 2000 and run.data.val.shape[0] == run.data.test.shape[0] == 500
