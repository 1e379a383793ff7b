"""`vaekit evaluate`: numbers of a trained run, determinism, active units, and bad input."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import types
from pathlib import Path

import pytest
import torch
from conftest import cli_error, run_vaekit

from vaekit.commands.evaluate import evaluate_run
from vaekit.errors import VaekitError
from vaekit.evaluation.importance import importance_estimates
from vaekit.evaluation.metrics import active_units
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
    # the NELBO of the first 5 of the same 20 draws: the IW-NLL stays, the NELBO is noisier
    five = evaluate_run(run_dir, k=20, nelbo_samples=5, seed=0, device="cpu", progress=False)
    assert five["iw_nll"] == a["iw_nll"] and five["nelbo"] != a["nelbo"]
    assert abs(five["nelbo"] - a["nelbo"]) < 1.0


class KnownWeights(torch.nn.Module):
    """weight_terms(x, k) over fixed, known sequences of log p(x|z) and level terms (no
    randomness): draw j of example i is row j, column i, whatever the chunking."""

    data_shape = (1,)

    def __init__(self, log_p_x: torch.Tensor, level_terms: torch.Tensor, outputs: int) -> None:
        super().__init__()
        self.table = (log_p_x, level_terms)  # (K, N) each
        self.likelihood = types.SimpleNamespace(num_params=outputs)  # decoder outputs per pair
        self.drawn: dict[int, int] = {}  # example index -> draws handed out so far

    def weight_terms(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        columns = x[:, 0].long().tolist()  # x holds each example's index
        start = self.drawn.get(columns[0], 0)
        for column in columns:
            self.drawn[column] = start + k
        log_p_x, terms = (t[start : start + k, columns] for t in self.table)
        return log_p_x, {"z": terms}


@pytest.mark.parametrize("outputs", [1, 7, 30, 1000])  # all 5 examples per call ... 4 draws of one
def test_one_pass_gives_the_exact_iw_bound_and_nelbo_whatever_the_chunks(outputs):
    generator = torch.Generator().manual_seed(0)
    log_p_x = torch.randn(30, 5, generator=generator, dtype=torch.float64) * 3 - 20
    terms = torch.rand(30, 5, generator=generator, dtype=torch.float64) * 4
    x = torch.arange(5.0).view(5, 1)
    model = KnownWeights(log_p_x, terms, outputs)
    estimates = importance_estimates(model, x, 30, nelbo_draws=10, chunk_elements=4096, progress=False)
    log_w = log_p_x - terms
    exact_iw = -(torch.logsumexp(log_w, 0) - math.log(30)).mean().item()
    assert math.isclose(estimates["iw_nll"], exact_iw, rel_tol=1e-9)
    assert math.isclose(estimates["rec"], -log_p_x[:10].mean().item(), rel_tol=1e-9)
    assert math.isclose(estimates["kl/z"], terms[:10].mean().item(), rel_tol=1e-9)
    assert math.isclose(estimates["nelbo"], -log_w[:10].mean().item(), rel_tol=1e-9)
    more = importance_estimates(KnownWeights(log_p_x, terms, outputs), x, 4, 30, 4096, progress=False)
    assert math.isclose(more["nelbo"], -log_w.mean().item(), rel_tol=1e-9)  # 30 draws, IW of 4
    assert math.isclose(more["iw_nll"], -(torch.logsumexp(log_w[:4], 0) - math.log(4)).mean().item())


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
