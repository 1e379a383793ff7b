"""Runs survive interruption and divergence: real subprocesses, real signals."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import read_events, run_vaekit, vaekit_executable

# Small but not trivial: long enough to be killed mid-run, short enough for CI.
RUN = [
    "trainer.max_epochs=12",
    "trainer.patience=100",
    "eval.iw_samples=16",
    "trainer.progress=false",
    "model.latent_dim=4",
]


def start_vaekit(*args: str, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.Popen(
        [vaekit_executable(), *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for_epoch(run_dir: Path, epoch: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    """Poll last.pt (atomic writes: always complete) until it holds at least `epoch`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before epoch {epoch}: {proc.communicate()}"
        try:
            done = torch.load(run_dir / "last.pt", weights_only=True)["fit_state"]["epoch"]
        except FileNotFoundError:
            done = 0
        if done >= epoch:
            return done
        time.sleep(0.02)
    raise AssertionError(f"no epoch {epoch} within {timeout} s")


# The lr changes every epoch and the checkpoints hold EMA and raw weights: both resume exactly.
COSINE_EMA = ("scheduler=cosine", "trainer.ema=0.999")


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """The uninterrupted run of RUN plus some overrides, trained once when first asked for."""
    runs = {}

    def reference_of(*extra: str) -> Path:
        if extra not in runs:
            cwd = tmp_path_factory.mktemp("reference")
            done = run_vaekit("train", *RUN, *extra, f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
            assert done.returncode == 0, done.stderr
            runs[extra] = cwd / "run"
        return runs[extra]

    return reference_of


@pytest.fixture(scope="module")
def reference(reference_runs):
    """The uninterrupted run every interrupted one must reproduce exactly."""
    return reference_runs()


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise-equal final weights and optimizer state, equal best epoch and test metrics."""
    last_a = torch.load(a / "last.pt", weights_only=True)
    last_b = torch.load(b / "last.pt", weights_only=True)
    for name, tensor in last_a["model"].items():
        assert torch.equal(tensor, last_b["model"][name]), name
    for key, value in last_a["optimizer"]["state"][0].items():
        assert torch.equal(value, last_b["optimizer"]["state"][0][key]), key
    assert last_a["optimizer"]["param_groups"][0]["lr"] == last_b["optimizer"]["param_groups"][0]["lr"]
    assert last_a["schedule"] == last_b["schedule"]
    for name, tensor in (last_a["raw_model"] or {}).items():  # the optimizer's weights, with EMA
        assert torch.equal(tensor, last_b["raw_model"][name]), name
    metrics_a = json.loads((a / "metrics.json").read_text())
    metrics_b = json.loads((b / "metrics.json").read_text())
    for key in ("best_epoch", "epochs", "test_nelbo", "test_iw_nll", "test_bpd", "val_nelbo"):
        assert metrics_a[key] == metrics_b[key], key


@pytest.mark.parametrize("extra", [(), COSINE_EMA], ids=["plain", "cosine_ema"])
def test_sigkill_at_a_random_point_then_resume_is_bitwise_identical(reference_runs, extra, tmp_path):
    reference = reference_runs(*extra)
    run_dir = tmp_path / "run"
    proc = start_vaekit("train", *RUN, *extra, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for_epoch(run_dir, 3, proc)
    # somewhere inside a later epoch, drawn from a seeded stream so a failure can be replayed
    time.sleep(0.2 * float(torch.rand((), generator=torch.Generator().manual_seed(11))))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = torch.load(run_dir / "last.pt", weights_only=True)["fit_state"]["epoch"]
    assert killed_at >= 3 and not (run_dir / "metrics.json").exists()
    done = run_vaekit("train", f"resume={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"resuming at epoch {killed_at}" in done.stdout + done.stderr
    assert_same_run(reference, run_dir)
    # the curves continue: every epoch once in what TensorBoard shows
    scalars, _ = read_events(run_dir)
    steps = [step for step, _ in scalars["val/nelbo"]]
    assert sorted(set(steps)) == list(range(1, 13))
    reference_scalars, _ = read_events(reference)
    assert dict(scalars["train/lr"]) == dict(reference_scalars["train/lr"])  # the schedule's, epoch by epoch


def test_sigterm_mid_epoch_writes_last_pt_and_resumes_exactly(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_vaekit("train", *RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for_epoch(run_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert f"resume with: vaekit train resume={run_dir}" in stderr
    assert "Traceback" not in stderr
    last = torch.load(run_dir / "last.pt", weights_only=True)
    status = json.loads((run_dir / "metrics.json").read_text())
    assert status["status"] == "interrupted" and last["fit_state"]["status"] == "interrupted"
    assert status["epochs"] == last["fit_state"]["epoch"]
    done = run_vaekit("train", f"resume={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same_run(reference, run_dir)


def test_resume_refuses_changes_to_what_is_trained_but_extends(reference, tmp_path):
    refused = run_vaekit("train", f"resume={reference}", "model.latent_dim=8", cwd=tmp_path)
    assert refused.returncode == 1
    assert "model.latent_dim cannot change" in refused.stderr and "Traceback" not in refused.stderr
    assert json.loads((reference / "metrics.json").read_text())["status"] == "finished"  # untouched
    missing = run_vaekit("train", f"resume={tmp_path}", cwd=tmp_path)
    assert missing.returncode == 1 and "holds no last.pt" in missing.stderr


def test_a_huge_learning_rate_rolls_back_then_gives_up(tmp_path):
    run_dir = tmp_path / "run"
    done = run_vaekit(
        "train",
        "optimizer.lr=10",
        "trainer.max_epochs=5",
        "eval.iw_samples=4",
        "trainer.progress=false",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "rolled back" in output and "learning rate now 2.5" in output
    assert "Training diverged" in done.stderr.strip().splitlines()[-1]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["rollbacks"] == 3
    scalars, _ = read_events(run_dir)
    assert [value for _, value in scalars["train/rollbacks"]] == [1, 2, 3]
    lrs = [value for _, value in scalars["train/lr"]]
    assert lrs == pytest.approx([5, 2.5, 1.25])


def test_a_sweep_with_a_failing_job_finishes_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_vaekit(
        "train",
        "-m",
        "model.latent_dim=2,0,3",
        "trainer.max_epochs=2",
        "eval.iw_samples=4",
        "eval.nelbo_samples=2",
        "trainer.progress=false",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert "1 sweep job(s) failed" in done.stderr and "Traceback" not in done.stderr
    # the summary is read from the job directories, so it names the job and its reason
    assert f"job 1 ({sweep / '1'}): failed: model.latent_dim must be at least 1, not 0." in done.stderr
    statuses = [json.loads((sweep / job / "metrics.json").read_text())["status"] for job in "012"]
    assert statuses == ["finished", "failed", "finished"]
    failed = json.loads((sweep / "1" / "metrics.json").read_text())
    assert "latent_dim must be at least 1" in failed["reason"]
