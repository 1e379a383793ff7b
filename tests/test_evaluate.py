"""`vaekit evaluate`: numbers of a trained run, determinism, active units, and bad input."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli_error, run_vaekit

from vaekit.commands.evaluate import evaluate_run
from vaekit.errors import VaekitError
from vaekit.evaluation import metrics
from vaekit.evaluation.metrics import active_units, iw_nll
from vaekit.training.checkpoint import CHECKPOINT_FORMAT

RESULT_KEYS = {
    "run_dir", "checkpoint", "epoch", "split", "num_examples", "k", "nelbo_samples", "seed", "batch_size",
    "device", "checksum",
    "nelbo", "rec", "kl", "kl_z", "iw_nll", "bpd", "nelbo_bpd", "active_units", "active_units_total",
    "latent_dims",
}  # fmt: skip


@pytest.fixture
def run_dir(trained_run: Path) -> Path:
    """The session's shared tiny digits run (2-D latent)."""
    return trained_run


def test_evaluate_command_prints_a_table_and_writes_json(run_dir: Path):
    done = run_vaekit("evaluate", str(run_dir), "--k", "50", "--seed", "3", cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr
    assert "| IW-NLL, k=50 (nats)" in done.stdout and "| active units" in done.stdout
    result = json.loads((run_dir / "eval_test_k50.json").read_text())
    assert set(result) == RESULT_KEYS
    assert result["split"] == "test" and result["num_examples"] == 447 and result["k"] == 50
    assert result["latent_dims"] == {"z": 2} and 0 <= result["active_units"]["z"] <= 2
    assert math.isclose(result["nelbo"], result["rec"] + result["kl"], rel_tol=1e-5)
    # the IW bound is tighter than the ELBO (both averaged over 447 examples: tiny noise)
    assert result["iw_nll"] <= result["nelbo"] + 0.05
    assert math.isclose(result["bpd"], result["iw_nll"] / (64 * math.log(2)))
    # in-process, same seed: byte-identical file; the CLI and the function agree
    json_before = (run_dir / "eval_test_k50.json").read_bytes()
    again = evaluate_run(run_dir, k=50, seed=3, device=result["device"], progress=False)
    assert (run_dir / "eval_test_k50.json").read_bytes() == json_before
    assert again["iw_nll"] == result["iw_nll"] and again["nelbo"] == result["nelbo"]


def test_seed_changes_the_draws_and_val_split_works(run_dir: Path):
    a = evaluate_run(run_dir, k=20, seed=0, device="cpu", progress=False)
    b = evaluate_run(run_dir, k=20, seed=1, device="cpu", progress=False)
    assert a["iw_nll"] != b["iw_nll"] and abs(a["iw_nll"] - b["iw_nll"]) < 1.0
    val = evaluate_run(run_dir, k=20, split="val", seed=0, device="cpu", progress=False, batch_size=64)
    assert val["num_examples"] == 350 and (run_dir / "eval_val_k20.json").is_file()
    # the NELBO stage is seeded on its own: k does not change it
    assert evaluate_run(run_dir, k=1, seed=0, device="cpu", progress=False)["nelbo"] == a["nelbo"]


class CountingModel(torch.nn.Module):
    """log_likelihood(x, k) over a fixed, known sequence of log-weights (no randomness)."""

    def __init__(self, log_weights: torch.Tensor) -> None:
        super().__init__()
        self.log_weights = log_weights  # (K, B)
        self.used = 0

    def log_likelihood(self, x: torch.Tensor, k: int) -> torch.Tensor:
        chunk = self.log_weights[self.used : self.used + k, : x.shape[0]]
        self.used += k
        return torch.logsumexp(chunk, dim=0) - math.log(k)


@pytest.mark.parametrize("k_chunk", [1, 7, 100])
def test_chunked_iw_estimate_combines_chunks_exactly(monkeypatch, k_chunk):
    monkeypatch.setattr(metrics, "K_CHUNK", k_chunk)
    log_weights = torch.randn(30, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    x = torch.zeros(5, 1)
    estimate = iw_nll(CountingModel(log_weights), x, 30, batch_size=5, progress=False)
    exact = -(torch.logsumexp(log_weights, 0) - math.log(30)).mean().item()
    assert math.isclose(estimate, exact, rel_tol=1e-9)


def test_active_units_counts_units_whose_mean_moves_with_x():
    generator = torch.Generator().manual_seed(0)
    n = 2000
    means = torch.stack(
        [
            torch.randn(n, generator=generator),  # variance 1: active
            0.05 * torch.randn(n, generator=generator),  # variance 0.0025: inactive
            torch.full((n,), 3.0),  # constant: collapsed
            0.2 * torch.randn(n, generator=generator),  # variance 0.04: active
        ],
        dim=1,
    )
    assert active_units(means) == {"z": 2}
    assert active_units({"z1": means, "z2": means[:, :1]}) == {"z1": 2, "z2": 1}
    assert active_units(means, threshold=0.001) == {"z": 3}
    with pytest.raises(ValueError):
        active_units(means[:1])


def test_bad_arguments_and_folders_give_one_sentence(run_dir: Path, tmp_path: Path, capsys):
    line = cli_error(capsys, "evaluate", str(run_dir), "--k", "0")
    assert line == "vaekit: error: --k must be at least 1, not 0."
    assert "--batch-size must be at least 1" in cli_error(
        capsys, "evaluate", str(run_dir), "--batch-size", "0"
    )
    assert "--nelbo-samples must be at least 1" in cli_error(
        capsys, "evaluate", str(run_dir), "--nelbo-samples", "0"
    )
    (tmp_path / "plain").mkdir()
    assert "is not a vaekit run directory" in cli_error(capsys, "evaluate", str(tmp_path / "plain"))
    assert "does not exist" in cli_error(capsys, "evaluate", str(tmp_path / "nowhere"))
    no_best = tmp_path / "no_best"
    shutil.copytree(run_dir / ".hydra", no_best / ".hydra")
    assert "has no best.pt" in cli_error(capsys, "evaluate", str(no_best))
    assert "holds 1 run(s)" in cli_error(capsys, "evaluate", str(run_dir.parent))
    with pytest.raises(VaekitError, match="--split must be one of"):
        evaluate_run(run_dir, split="train")


class MakesMarker:
    """Unpickling this would create a marker file, if anyone allowed it to run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_run(tmp_path: Path, name: str, run_dir: Path, payload: bytes) -> Path:
    folder = tmp_path / name
    shutil.copytree(run_dir / ".hydra", folder / ".hydra")
    (folder / "best.pt").write_bytes(payload)
    return folder


def test_corrupt_and_crafted_checkpoints_are_refused_without_running_code(
    run_dir: Path, tmp_path: Path, capsys
):
    marker = tmp_path / "MARKER"
    crafted = tmp_path / "crafted.pt"
    torch.save({"config": {}, "model": MakesMarker(marker)}, crafted)  # torch's zip format
    good = (run_dir / "best.pt").read_bytes()
    cases = {
        "truncated": (good[: len(good) // 2], "is not a readable vaekit checkpoint"),
        "crafted": (crafted.read_bytes(), "will not unpickle, since they could run code"),
        "raw_pickle": (pickle.dumps(MakesMarker(marker)), "will not unpickle, since they could run code"),
    }
    for name, (payload, message) in cases.items():
        folder = bad_run(tmp_path, name, run_dir, payload)
        line = cli_error(
            capsys, "evaluate", str(folder), "--k", "2"
        )  # in-process: test_hostile runs the command
        assert message in line, (name, line)
        assert not marker.exists(), f"{name}: unpickling ran code"
    # not a dict / no config: still one sentence (in-process, no need for a subprocess)
    folder = bad_run(tmp_path, "tensor_only", run_dir, b"")
    torch.save(torch.zeros(3), folder / "best.pt")
    with pytest.raises(VaekitError, match="is not a vaekit checkpoint"):
        evaluate_run(folder, k=2)
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}}, folder / "best.pt")
    with pytest.raises(VaekitError, match="holds no saved config"):
        evaluate_run(folder, k=2)


def test_evaluate_with_the_runs_settings_reproduces_its_test_metrics(run_dir: Path):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = evaluate_run(run_dir, k=8, nelbo_samples=2, progress=False)  # FAST's eval settings
    assert result["iw_nll"] == metrics["test_iw_nll"]  # same seed, same batches: the same numbers
    assert result["nelbo"] == metrics["test_nelbo"]
    assert result["active_units"]["z"] == metrics["test_active_units_z"]
    other_seed = evaluate_run(run_dir, k=8, nelbo_samples=2, seed=1, progress=False)
    assert other_seed["iw_nll"] != metrics["test_iw_nll"]
