"""Sweeps at scale through the real plugins: Optuna on the validation NELBO with trials side by
side under joblib, a submitit_local job preempted and requeued into its own directory, and the
one-sentence refusals of launchers, sweepers and searches."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import joblib
import pytest
from conftest import cli_error, read_events, run_vaekit
from omegaconf import OmegaConf
from test_resume import assert_same_run, start_vaekit, wait_for_epoch

from vaekit.commands.plugins import INSTALL
from vaekit.commands.report import report
from vaekit.commands.threads import job_threads, parallel_jobs

TINY = ["model.latent_dim=4", "net.hidden_dim=32", "trainer.max_epochs=2", "eval.iw_samples=4",
        "trainer.progress=false", "trainer.log_images=false"]  # fmt: skip


def statuses(sweep: Path) -> dict[str, dict]:
    """job name -> its metrics.json."""
    jobs = [job for job in sweep.iterdir() if job.name.isdigit()]
    return {job.name: json.loads((job / "metrics.json").read_text()) for job in jobs}


def test_an_optuna_search_minimizes_the_validation_nelbo_and_goes_on_after_a_diverged_trial(tmp_path):
    sweep = tmp_path / "search"
    done = run_vaekit(
        "train",
        "-m",
        "hparams_search=optuna_digits",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.n_jobs=2",  # two trials at a time, side by side under joblib
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "optimizer.lr=choice(0.003,100.0)",  # the seeded sampler draws 100 for some trials: they diverge
        "trainer.max_rollbacks=0",
        *TINY,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output  # the diverged trials are failed jobs of the sweep
    assert "Traceback" not in output
    jobs = statuses(sweep)
    diverged = sorted(job for job, m in jobs.items() if m["status"] == "diverged")
    ended = {job: m for job, m in jobs.items() if m["status"] in ("finished", "early_stopped")}
    assert len(jobs) == 6 and diverged and ended and len(diverged) + len(ended) == 6
    overrides = {job: OmegaConf.load(sweep / job / ".hydra" / "overrides.yaml") for job in jobs}
    assert all("optimizer.lr=100.0" in overrides[job] for job in diverged)
    # each diverged trial returned nothing, which Optuna records as a failed trial, and searched on
    assert output.count("Failed experiment: Return value must be float-castable. Got 'None'") == len(diverged)
    # the objective is the best validation NELBO of metrics.json, never a test number
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    best = min(ended, key=lambda job: ended[job]["val_nelbo"])
    assert results.best_value == ended[best]["val_nelbo"] != ended[best]["test_nelbo"]
    assert all(f"{key}={value}" in overrides[best] for key, value in results.best_params.items())
    # the summary is read from the job directories, so it holds under joblib
    n_finished = sum(m["status"] == "finished" for m in ended.values())
    summary = f"sweep of 6 jobs ({sweep}): {n_finished} finished, {len(ended) - n_finished} early-stopped, "
    assert f"{summary}{len(diverged)} failed" in done.stdout
    assert all(f"job {job} ({sweep / job}): diverged: Training diverged" in done.stderr for job in diverged)
    threads, parallel = job_threads({"_target_": "x.JoblibLauncher", "n_jobs": 2}, joblib.cpu_count())
    assert f"{parallel} jobs side by side" in (sweep / "0" / "train.log").read_text()
    assert f"on cpu ({threads} threads)" in (sweep / "0" / "train.log").read_text()
    # vaekit report lists the trials with their parameters and the value searched on
    text, _, _ = report(sweep)
    assert "Optuna search: 6 trials" in text and f"best validation NELBO {results.best_value:.2f}" in text
    for job in diverged:
        assert f"| {job} | 100.0 |" in text and "diverged" in text


def test_a_preempted_submitit_job_is_requeued_and_continues_bitwise_in_its_directory(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    run = ["trainer.max_epochs=6", "trainer.patience=100", "eval.iw_samples=4", "trainer.progress=false",
           "model.latent_dim=4", "trainer.num_threads=1"]  # fmt: skip
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = "USR1"  # the issue's --signal=USR1@90 (submitit's default: USR2)
    try:
        # two jobs of one config: job 1 is the uninterrupted twin of job 0
        proc = start_vaekit("train", "-m", "hydra/launcher=submitit_local", "trainer.seed=0,0", *run,
                            f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    finally:
        del os.environ["SUBMITIT_PREEMPT_SIGNAL"]
    wait_for_epoch(sweep / "0", 2, proc)
    pid = int((sweep / "0" / ".lock").read_text())  # the job's own process, under submitit's
    os.kill(pid, signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"sweep of 2 jobs ({sweep}): 2 finished, 0 early-stopped, 0 failed" in stdout
    job_log = "".join(path.read_text() for path in (sweep / ".submitit").rglob("*_log.*"))  # out and err
    assert "SIGUSR1 passed on to the launcher" in job_log and "Requeued job" in job_log
    assert "resuming at epoch" in (sweep / "0" / "train.log").read_text()
    assert_same_run(sweep / "1", sweep / "0")
    scalars, _ = read_events(sweep / "0")
    assert sorted(step for step, _ in scalars["val/nelbo"]) == list(range(1, 7))  # no epoch twice
    # rerunning a finished job of the same config trains nothing; another config is refused
    finished = (sweep / "1" / "metrics.json").read_bytes()
    done = run_vaekit("train", *run, "trainer.seed=0", f"hydra.run.dir={sweep / '1'}", cwd=tmp_path)
    assert done.returncode == 0 and "finished: nothing to train" in done.stdout + done.stderr
    assert (sweep / "1" / "metrics.json").read_bytes() == finished
    line = cli_error(capsys, "train", *run, "model.latent_dim=5", f"hydra.run.dir={sweep / '1'}")
    assert line.endswith("since its config differs from this one in model.latent_dim (4 there, 5 here).")
    assert f"already holds a run: continue it with `vaekit train resume={sweep / '1'}`" in line


@pytest.mark.parametrize(
    "override, message",
    [
        ("hydra/launcher=jobllib", "names no launcher: choose from basic, joblib, slurm, submitit_local"),
        ("hydra/sweeper=optuner", "hydra/sweeper=optuner names no sweeper: choose from basic, optuna."),
        ("hparams_search=nope", "hparams_search=nope names no search preset: choose from optuna_digits"),
    ],
)
def test_unknown_launchers_sweepers_and_searches_are_one_sentence(capsys, override, message):
    assert message in cli_error(capsys, "train", "-m", override)


@pytest.mark.parametrize(
    "hidden, override, package",
    [
        ("optuna", "hparams_search=optuna_digits", "hydra/sweeper=optuna needs the hydra-optuna-sweeper"),
        ("submitit", "hydra/launcher=slurm", "hydra/launcher=slurm needs the hydra-submitit-launcher"),
    ],
)
def test_a_plugin_not_installed_names_the_extra(tmp_path, hidden, override, package):
    # a fresh interpreter in which `hidden` cannot be imported, as where the extra is not installed
    hide = f"import sys; sys.modules[{hidden!r}] = None"
    code = f"{hide}; import vaekit.cli; vaekit.cli.main(['train', {override!r}])"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == f"vaekit: error: {package} plugin, not installed: {INSTALL}."


def test_parallel_jobs_share_the_cores():
    assert [parallel_jobs(n, 16) for n in (-1, -2, 2, 64)] == [16, 15, 2, 16]
    assert job_threads({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
                        "n_jobs": 4}, 16) == (4, 4)  # fmt: skip
    assert job_threads({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 16) is None


def test_the_slurm_preset_extends_the_plugins_config():
    from hydra import compose, initialize_config_dir

    from vaekit.commands.train import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]
        cfg = compose("train", overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.signal_delay_s, launcher.gpus_per_node) == ("gpu", 90, 1)
    assert launcher.max_num_timeout > 0  # requeued after time limits, too
    assert launcher.qos is None  # a key of the plugin's own config, which the preset extends
