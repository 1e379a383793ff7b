"""The Python API (vaekit.train, load_run, evaluate, Run): the run directory and the numbers of
the real CLI, lazy data, weights-only loading of best or last, the CLI's refusals, and the
README's example, run as written but for the evaluation's size."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO, compose_train
from omegaconf import OmegaConf

import vaekit
from vaekit.errors import VaekitError

# the settings of the session's `trained_run`, which the real `vaekit train` command ran
CLI_SETTINGS = [*FAST, "model.latent_dim=2", "trainer.deterministic=true"]
# what evaluate and sample add to a run directory after training (other tests share trained_run)
AFTER_TRAINING = re.compile(r"(eval_.*\.json|.*\.png)")


def layout(run_dir: Path) -> Counter:
    """Every path in a run directory, relative; event files by kind (their names hold a time
    and a process id), files that later commands write left out."""
    found: Counter = Counter()
    for path in run_dir.rglob("*"):
        relative = path.relative_to(run_dir)
        if len(relative.parts) == 1 and AFTER_TRAINING.fullmatch(relative.name):
            continue
        if relative.name.startswith("events.out.tfevents."):
            relative = relative.with_name("events.out.tfevents.*")
        found[str(relative)] += 1
    return found


@pytest.fixture(scope="module")
def api_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The trained_run settings, trained in this process through vaekit.train (once)."""
    run_dir = tmp_path_factory.mktemp("api") / "api run"  # a space: Hydra gets it quoted
    try:
        metrics = vaekit.train(CLI_SETTINGS, run_dir=run_dir)
    finally:  # trainer.deterministic switches torch's global flags: leave them as they were
        torch.use_deterministic_algorithms(False)
    return run_dir, metrics


def test_train_writes_the_run_directory_and_the_numbers_of_the_cli(api_run, trained_run: Path):
    run_dir, metrics = api_run
    assert layout(run_dir) == layout(trained_run)
    for name in ("config.yaml", "overrides.yaml"):
        assert OmegaConf.load(run_dir / ".hydra" / name) == OmegaConf.load(trained_run / ".hydra" / name)
    ours, theirs = (OmegaConf.load(d / ".hydra" / "hydra.yaml").hydra for d in (run_dir, trained_run))
    assert ours.mode == theirs.mode == "RUN"
    assert ours.runtime.choices == theirs.runtime.choices and ours.job.name == theirs.job.name == "train"
    assert ours.runtime.output_dir == str(run_dir)
    cli_metrics = json.loads((trained_run / "metrics.json").read_text())
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written == {key: value for key, value in metrics.items() if key != "run_dir"}
    assert metrics["run_dir"] == str(run_dir) and metrics["status"] == "finished" and metrics["epochs"] == 3
    assert metrics["data_checksums"] == cli_metrics["data_checksums"]
    for key in ("test_nelbo", "test_iw_nll", "test_bpd", "val_nelbo"):  # same seed, same model
        assert metrics[key] == pytest.approx(cli_metrics[key], rel=1e-4), key
    log = (run_dir / "train.log").read_text().splitlines()
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] training VAE on digits .*", log[0])


def test_load_run_sample_and_evaluate(api_run):
    run_dir, metrics = api_run
    run = vaekit.load_run(run_dir)
    assert isinstance(run, vaekit.Run) and run.checkpoint == run_dir / "best.pt"
    assert not run.model.training and run.device == torch.device("cpu")
    assert run.epoch == metrics["best_epoch"] and run.config.model.latent_dim == 2
    assert run.metrics == json.loads((run_dir / "metrics.json").read_text())
    assert run._raw is None and run._data is None  # the data waits for its first use
    torch.manual_seed(0)
    grid = run.model.sample(64)
    assert grid.shape == (64, 1, 8, 8) and grid.device == run.device
    assert torch.isfinite(grid).all() and 0 <= grid.min() and grid.max() <= 1  # means of 17 levels / 16
    assert run.data.test.shape == (447, 1, 8, 8) and run.raw.train.shape[0] == 1000
    # the same seed and k as training's final evaluation: metrics.json's numbers, exactly
    result = vaekit.evaluate(run, k=8, nelbo_samples=2, progress=False)
    assert result["iw_nll"] == metrics["test_iw_nll"] and result["nelbo"] == metrics["test_nelbo"]
    assert result["checkpoint"] == "best.pt" and Path(result["path"]) == run_dir / "eval_test_k8.json"
    by_path = vaekit.evaluate(str(run_dir), k=8, nelbo_samples=2, progress=False, device="cpu")
    assert by_path["iw_nll"] == result["iw_nll"]
    last = vaekit.load_run(run_dir, which="last")
    assert last.checkpoint.name == "last.pt" and last.epoch == metrics["epochs"]
    scored = vaekit.evaluate(last, k=8, nelbo_samples=2, split="val", progress=False)
    assert Path(scored["path"]).name == "eval_val_k8_last.json" and scored["num_examples"] == 350


def test_the_clis_refusals_are_one_sentence_and_change_nothing(api_run, tmp_path: Path):
    run_dir, _ = api_run
    kept = ["best.pt", "metrics.json", ".hydra/overrides.yaml", ".hydra/config.yaml", "train.log"]
    before = {name: (run_dir / name).read_bytes() for name in kept}
    with pytest.raises(VaekitError, match=r"already holds a run: continue it with `vaekit train resume="):
        vaekit.train(["trainer.max_epochs=7"], run_dir=run_dir)
    assert {name: (run_dir / name).read_bytes() for name in kept} == before
    bad = tmp_path / "bad"
    with pytest.raises(VaekitError, match=r"^trainer.max_epochs must be at least 1, not 0\.$"):
        vaekit.train(["trainer.max_epochs=0"], run_dir=bad)
    assert json.loads((bad / "metrics.json").read_text())["status"] == "failed"  # as the CLI records it
    assert not (bad / "best.pt").exists()
    for overrides, message in [
        (["prior=nope"], r"Could not find 'prior/nope'"),
        (["+experiment=nope"], r"^\+experiment=nope names no experiment preset: choose from .*vampprior"),
        (["debug=fast"], r"with a plus: \+debug=fast\.$"),
        ("prior=mog", r"must be a list of strings"),
    ]:
        with pytest.raises(VaekitError, match=message):
            vaekit.train(overrides, run_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(VaekitError, match=r"^which must be best or last"):
        vaekit.load_run(run_dir, which="middle")
    with pytest.raises(VaekitError, match=r"does not exist"):
        vaekit.load_run(tmp_path / "nothing")
    with pytest.raises(VaekitError, match=r"^--k must be at least 1"):
        vaekit.evaluate(run_dir, k=0)


def test_train_takes_a_composed_config_and_records_what_differs(tmp_path: Path):
    cfg = compose_train(*FAST, "model.latent_dim=2")
    cfg.trainer.max_epochs = 1
    cfg.net.hidden_dim = 32
    metrics = vaekit.train(cfg, run_dir=tmp_path / "run")
    assert metrics["epochs"] == 1 and metrics["status"] == "finished"
    overrides = OmegaConf.load(tmp_path / "run" / ".hydra" / "overrides.yaml")
    expected = [*FAST[1:], "trainer.max_epochs=1", "model.latent_dim=2", "net.hidden_dim=32"]
    assert sorted(overrides) == sorted(expected)
    assert OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml").net.hidden_dim == 32
    choices = OmegaConf.load(tmp_path / "run" / ".hydra" / "hydra.yaml").hydra.runtime.choices
    assert "net" not in choices and "model" not in choices  # no longer the options' own
    assert choices.dataset == "digits" and choices.prior == "standard"


def test_import_vaekit_imports_neither_torch_nor_hydra():
    code = "import sys, vaekit; print(sorted({'torch', 'hydra', 'omegaconf'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert vaekit.__all__ == ["Run", "evaluate", "load_run", "train"]


def readme_api_example() -> str:
    """The first python block of README's "Python API" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_runs(tmp_path: Path, monkeypatch, capsys):
    code = readme_api_example()
    assert 'vaekit.train(["prior=vampprior", "trainer.max_epochs=5"], run_dir="outputs/nb")' in code
    assert 'run = vaekit.load_run("outputs/nb")' in code and "grid = run.model.sample(64)" in code
    # as written, but 2 epochs and small evaluations, to keep the suite fast
    small = '"trainer.max_epochs=2", "eval.iw_samples=10", "trainer.progress=false", "prior.num_components=9"'
    code = code.replace('"trainer.max_epochs=5"', small).replace("k=5000", "k=10")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["grid"].shape == (64, 1, 8, 8)
    assert namespace["result"]["k"] == 10 and namespace["metrics"]["epochs"] == 2
    assert (tmp_path / "outputs" / "nb" / "best.pt").is_file()
    assert "test NELBO" in capsys.readouterr().out  # the CLI's summary line
