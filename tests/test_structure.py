"""The layout's promises: runs.py imports no Hydra app, and old run directories keep working
(the sweep summary read from job directories is tested in test_resume.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, run_vaekit

from vaekit import cli
from vaekit.errors import VaekitError
from vaekit.training.checkpoint import load_checkpoint

OLD_RUN = FIXTURES / "run_v1"  # written by vaekit before the package layout (see its overrides.yaml)


def test_importing_runs_and_build_registers_no_hydra_app():
    probe = (
        "import sys, vaekit.runs, vaekit.build\n"
        "from hydra.core.config_store import ConfigStore\n"
        "from omegaconf import OmegaConf\n"
        "print('vaekit.commands.train' in sys.modules, OmegaConf.has_resolver('vaekit_if_resume'),\n"
        "      'train_schema.yaml' in ConfigStore.instance().repo)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False", "False"]


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """A copy of the run directory that vaekit wrote before this layout (digits, latent 4)."""
    return Path(shutil.copytree(OLD_RUN, tmp_path / "old_run"))


def test_an_old_run_still_evaluates_samples_and_reports(old_run: Path, capsys):
    metrics = json.loads((old_run / "metrics.json").read_text())
    cli.main(["evaluate", str(old_run), "--k", "8", "--nelbo-samples", "2", "--no-progress"])
    result = json.loads((old_run / "eval_test_k8.json").read_text())
    # the same weights on the same test set: the test NELBO agrees with training's within noise
    assert abs(result["nelbo"] - metrics["test_nelbo"]) < 0.5
    assert result["iw_nll"] <= result["nelbo"] + 0.5
    cli.main(["sample", str(old_run), "--n", "4"])
    assert (old_run / "samples.png").stat().st_size > 0
    cli.main(["report", str(old_run.parent)])
    assert "old_run" in capsys.readouterr().out


def test_an_old_run_still_resumes(old_run: Path, tmp_path: Path):
    done = run_vaekit(
        "train", f"resume={old_run}", "trainer.max_epochs=3", "trainer.progress=false", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "resuming at epoch 2" in done.stdout + done.stderr
    metrics = json.loads((old_run / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["status"] == "finished"
    assert load_checkpoint(old_run / "last.pt")["fit_state"]["epoch"] == 3


def test_a_checkpoint_of_unknown_format_is_one_sentence(old_run: Path):
    checkpoint = torch.load(old_run / "best.pt", weights_only=True)
    torch.save({**checkpoint, "format": 99}, old_run / "best.pt")
    with pytest.raises(VaekitError, match="has checkpoint format 99, but this vaekit reads format 1"):
        load_checkpoint(old_run / "best.pt")
