"""The real `vaekit train` command, end to end, in subprocesses."""

import json
import math
import re

import pytest
import torch
from conftest import FAST, compose_train, read_events, run_vaekit

from vaekit import cli
from vaekit.commands.train import CONFIG_DIR
from vaekit.errors import VaekitError


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One short default run on digits, shared by the tests that read its outputs."""
    cwd = tmp_path_factory.mktemp("digits")
    run_dir = cwd / "run"
    done = run_vaekit(
        "train", *FAST, "trainer.max_epochs=4", "trainer.num_threads=1", f"hydra.run.dir={run_dir}", cwd=cwd
    )
    assert done.returncode == 0, done.stderr
    return run_dir, done


def test_train_prints_one_final_line_and_writes_metrics(digits_run):
    run_dir, done = digits_run
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("test NELBO") and "IW-NLL (k=8)" in last and "bits/dim" in last
    assert f"run: {run_dir}" in last
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in (
        "test_nelbo",
        "test_rec",
        "test_kl",
        "test_iw_nll",
        "test_bpd",
        "best_epoch",
        "epochs",
        "train_seconds",
    ):
        assert key in metrics, key
    assert metrics["epochs"] == 4 and 1 <= metrics["best_epoch"] <= 4
    assert metrics["status"] == "finished"
    assert 0 <= metrics["test_active_units_z"] <= 16
    assert math.isclose(metrics["test_nelbo"], metrics["test_rec"] + metrics["test_kl"], rel_tol=1e-5)
    # an importance-weighted bound is tighter than the ELBO (k=8 already, on 447 test images)
    assert metrics["test_iw_nll"] < metrics["test_nelbo"]
    assert math.isclose(metrics["test_bpd"], metrics["test_iw_nll"] / (64 * math.log(2)), rel_tol=1e-9)
    # an untrained model would sit near 64 * log(17) = 181 nats; 4 epochs already do better
    assert metrics["test_nelbo"] < 150


def test_tensorboard_events_hold_curves_images_and_hparams(digits_run):
    run_dir, _ = digits_run
    scalars, images = read_events(run_dir)
    for split in ("train", "val"):
        for term in ("nelbo", "rec", "kl"):
            steps = [step for step, _ in scalars[f"{split}/{term}"]]
            assert steps == [1, 2, 3, 4], (split, term, steps)
    nelbo = dict(scalars["val/nelbo"])
    rec, kl = dict(scalars["val/rec"]), dict(scalars["val/kl"])
    assert all(math.isclose(nelbo[s], rec[s] + kl[s], rel_tol=1e-4) for s in nelbo)
    assert {"samples", "reconstructions"} <= images
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ((_, hparam_nelbo),) = scalars["hparam/test_nelbo"]
    # the Projector: test-set latent means with their labels, at the best epoch
    assert "latent_means" in (run_dir / "tb" / "projector_config.pbtxt").read_text()
    folder = run_dir / "tb" / f"{metrics['best_epoch']:05d}" / "latent_means"
    rows = (folder / "tensors.tsv").read_text().strip().splitlines()
    assert len(rows) == 447 and len(rows[0].split("\t")) == 16
    labels = (folder / "metadata.tsv").read_text().split()
    assert sorted(set(labels)) == [str(d) for d in range(10)]
    assert math.isclose(hparam_nelbo, metrics["test_nelbo"], rel_tol=1e-5)


def test_checkpoints_load_with_weights_only(digits_run):
    run_dir, _ = digits_run
    best = torch.load(run_dir / "best.pt", weights_only=True)
    last = torch.load(run_dir / "last.pt", weights_only=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert best["fit_state"]["epoch"] == metrics["best_epoch"]
    assert last["fit_state"]["epoch"] == 4
    assert best["config"]["model"]["latent_dim"] == 16
    assert {"model", "optimizer", "rng", "config", "fit_state"} <= set(last)
    assert not list(run_dir.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_help_and_cfg_behave_as_in_hydra(tmp_path):
    top = run_vaekit(cwd=tmp_path)
    assert top.returncode == 0
    for command in cli.COMMANDS:  # every command is listed with what it does
        assert re.search(rf"^  {command} +\w", top.stdout, re.MULTILINE), command
    helped = run_vaekit("train", "--help", cwd=tmp_path)
    assert helped.returncode == 0
    # configs/hydra/ holds Hydra's own groups (launchers), which --hydra-help lists
    for folder in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        options = ", ".join(sorted(f.stem for f in folder.glob("*.yaml")))  # each group with its options
        assert f"{folder.name}: {options}" in helped.stdout, folder.name
    shown = run_vaekit("train", "--cfg", "job", "model.latent_dim=5", cwd=tmp_path)
    assert shown.returncode == 0 and "latent_dim: 5" in shown.stdout
    assert not (tmp_path / "outputs").exists()  # --cfg composes, trains nothing


def test_multirun_sweep_writes_one_run_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_vaekit(
        "train",
        "-m",
        "model.latent_dim=2,3",
        "trainer.max_epochs=2",
        *FAST[1:],
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    for job, latent in (("0", 2), ("1", 3)):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["epochs"] == 2
        assert (
            torch.load(sweep / job / "best.pt", weights_only=True)["config"]["model"]["latent_dim"] == latent
        )


def test_mnist_from_idx_files_with_bernoulli_likelihood(tmp_path, fake_mnist):
    run_dir = tmp_path / "run"
    done = run_vaekit(
        "train",
        "dataset=mnist",
        f"dataset.root={fake_mnist}",
        "dataset.val_size=20",
        "trainer.max_epochs=2",
        "trainer.batch_size=32",
        *FAST[1:],
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = torch.load(run_dir / "best.pt", weights_only=True)["config"]
    assert config["likelihood"]["_target_"].endswith("BernoulliLikelihood")  # the dataset's pick
    assert 0 < metrics["test_nelbo"] < 784 * math.log(2) * 1.5
    assert metrics["test_bpd"] > 0


# Bad values found after composition: checked in-process (the same code the command runs).
BAD_VALUES = [
    (["model.latent_dim=0"], "model.latent_dim must be at least 1, not 0."),
    (["trainer.patience=-1"], "trainer.patience must be 0 or more, not -1."),
    (["trainer.batch_size=5000"], "larger than the training split (1000 examples)"),
    (["trainer.max_epochs=0"], "trainer.max_epochs must be at least 1"),
    (["eval.iw_samples=0"], "eval.iw_samples must be at least 1"),
    (["trainer.num_threads=0"], "trainer.num_threads must be at least 1"),
    (["eval.nelbo_samples=0"], "eval.nelbo_samples must be at least 1"),
    (["eval.batch_size=0"], "eval.batch_size must be at least 1"),
    (["dataset=mnist", "dataset.root=nowhere"], "MNIST not found: put train-images-idx3-ubyte"),
    (["dataset=kmnist", "dataset.root=nowhere"], "KMNIST not found: put train-images-idx3-ubyte"),
    (["likelihood.num_vals=4"], "likelihood.num_vals=4 does not divide"),
    (
        ["dataset.shape=[1,28,28]"],
        "dataset.shape is [1, 28, 28] but the digits files hold images of shape [1, 8, 8]",
    ),
    (["dataset.num_levels=256"], "dataset.num_levels is 256 but digits has 17 intensity levels"),
    (
        ["trainer.device=cuda:7"] if not torch.cuda.is_available() else ["trainer.device=tpu"],
        "trainer.device=",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_values_get_one_clear_sentence(tmp_path, overrides, message):
    from vaekit.commands.train import train

    cfg = compose_train(*overrides, "trainer.progress=false")
    with pytest.raises(VaekitError) as error:
        train(cfg, tmp_path / "run")
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


# Errors of composition itself, through the real command (test_hostile runs many more).
BAD_INPUTS = [
    (["prior=nope"], "Could not find 'prior/nope'"),
    (["trainer.patienc=3"], "Key 'patienc' not in 'TrainerConfig'"),
    (["trainer.patience=abc"], "could not be converted to Integer"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_gets_one_clear_sentence(tmp_path, overrides, message):
    done = run_vaekit("train", *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert message in output
    assert "Traceback" not in output


def test_num_threads_sets_the_cpu_threads_of_the_run(digits_run):
    _, done = digits_run  # trained with trainer.num_threads=1
    assert "on cpu (1 threads)" in done.stdout + done.stderr


def test_bad_input_failure_is_recorded_in_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    done = run_vaekit("train", "model.latent_dim=0", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 1
    assert (
        done.stderr.strip().splitlines()[-1] == "vaekit: error: model.latent_dim must be at least 1, not 0."
    )
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "failed" and "latent_dim" in record["reason"]
