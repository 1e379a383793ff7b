"""logger=tensorboard|mlflow|csv and lists of them: what each store holds, read back for real,
and how a resumed run continues each record."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
from conftest import FAST, cli_error, compose_train, read_events, run_vaekit

from vaekit.loggers.select import logger_names
from vaekit.runs import find_runs

ALL = "logger=[tensorboard,mlflow,csv]"
# mlflow's own use of SQLAlchemy, in this process where the tests read the store back
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


def read_csv(path: Path) -> dict[int, dict[str, float]]:
    """metrics.csv by epoch, its cells as floats (empty cells left out)."""
    with path.open(newline="") as handle:
        return {
            int(row.pop("epoch")): {k: float(v) for k, v in row.items() if v != ""}
            for row in csv.DictReader(handle)
        }


def mlflow_runs(tmp: Path):
    """The runs of experiment vaekit in the default local store of a run started in `tmp`."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'outputs' / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["vaekit"])


def metric_history(tmp: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'outputs' / 'mlflow.db'}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short run writing to all three loggers, mlflow in its default store under outputs/."""
    pytest.importorskip("mlflow", reason="pip install '.[test]' installs mlflow")
    tmp = tmp_path_factory.mktemp("loggers")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store, not the user's
        settings = [*FAST, ALL, "trainer.image_every=1", f"hydra.run.dir={tmp / 'run'}"]
        done = run_vaekit("train", *settings, cwd=tmp)
    assert done.returncode == 0, done.stderr
    return tmp


def test_logger_takes_one_name_or_a_list_from_the_command_line():
    assert logger_names(compose_train().logger) == ["tensorboard"]
    assert logger_names(compose_train("logger=mlflow").logger) == ["mlflow"]
    assert logger_names(compose_train("logger=[tensorboard,mlflow]").logger) == ["tensorboard", "mlflow"]
    cfg = compose_train("logger=[csv]", "loggers.mlflow.tracking_uri=http://tracking:5000")
    assert logger_names(cfg.logger) == ["csv"] and cfg.loggers.mlflow.tracking_uri == "http://tracking:5000"


def test_an_unknown_logger_is_one_sentence_naming_the_known_ones(capsys, tmp_path):
    line = cli_error(capsys, "train", "logger=[tensorboard,wandb]", f"hydra.run.dir={tmp_path / 'run'}")
    assert "logger=wandb is not a logger vaekit knows: choose from tensorboard, mlflow, csv" in line


def test_mlflow_missing_is_refused_before_training_naming_the_extra(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` fails as when not installed
    line = cli_error(capsys, "train", *FAST, "logger=mlflow", f"hydra.run.dir={tmp_path / 'run'}")
    assert "logger=mlflow needs the mlflow package" in line and "pip install 'vaekit[mlflow]'" in line
    assert not (tmp_path / "run" / "last.pt").exists()  # nothing was trained


def test_the_three_loggers_hold_the_same_numbers(logged_run):
    tmp, run = logged_run, logged_run / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    # mlflow: the acceptance check, the final test NELBO as metrics.json has it
    (found,) = (row for _, row in mlflow_runs(tmp).iterrows())
    assert found["status"] == "FINISHED"
    assert found["metrics.test_nelbo"] == metrics["test_nelbo"]
    assert found["metrics.test_iw_nll"] == metrics["test_iw_nll"]
    assert found["params.model.latent_dim"] == "16" and found["params.prior"] == "standard"
    # per-epoch curves: csv, mlflow and TensorBoard agree epoch by epoch
    rows = read_csv(run / "metrics.csv")
    assert sorted(rows) == [1, 2, 3]
    csv_curve = [(epoch, row["val/nelbo"]) for epoch, row in sorted(rows.items())]
    assert metric_history(tmp, found["run_id"], "val/nelbo") == csv_curve
    scalars, images = read_events(run)
    for (step, value), (epoch, expected) in zip(sorted(scalars["val/nelbo"]), csv_curve, strict=True):
        assert step == epoch and math.isclose(value, expected, rel_tol=1e-6)  # TensorBoard keeps float32
    assert min(v for _, v in csv_curve) == metrics["val_nelbo"]
    with (run / "final_metrics.csv").open(newline="") as handle:
        (final,) = list(csv.DictReader(handle))
    assert float(final["test_nelbo"]) == metrics["test_nelbo"] and final["prior"] == "standard"
    # artifacts: a PNG per grid and image epoch, and best.pt byte for byte
    artifacts = tmp / "outputs" / "mlartifacts" / found["run_id"] / "artifacts"
    assert (artifacts / "best.pt").read_bytes() == (run / "best.pt").read_bytes()
    pngs = sorted(p.name for p in (artifacts / "images").glob("*.png"))
    names = ("reconstructions", "samples")
    assert pngs == [f"{name}_{epoch:05d}.png" for name in names for epoch in (1, 2, 3)]
    assert (artifacts / "images" / "samples_00003.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"samples", "reconstructions"} <= images
    assert find_runs(tmp) == [run]  # mlflow's copy of best.pt under outputs/ is not taken for a run


def test_a_resumed_run_continues_each_record_without_repeating_epochs(logged_run):
    tmp, run = logged_run, logged_run / "run"
    (before,) = mlflow_runs(tmp)["run_id"]
    with (run / "metrics.csv").open("a", newline="") as handle:  # as if killed after logging epoch 4
        csv.writer(handle).writerow([4] + [1.0] * (len(read_csv(run / "metrics.csv")[1])))
    done = run_vaekit("train", f"resume={run}", "trainer.max_epochs=5", cwd=run)  # from another folder
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    rows = read_csv(run / "metrics.csv")
    assert sorted(rows) == [1, 2, 3, 4, 5] and rows[4]["val/nelbo"] != 1.0
    runs = mlflow_runs(tmp)
    assert list(runs["run_id"]) == [before]  # the same mlflow run, continued
    found = runs.iloc[0]
    assert found["status"] == "FINISHED" and found["metrics.test_nelbo"] == metrics["test_nelbo"]
    assert found["tags.vaekit.resumed.trainer.max_epochs"] == "5"  # mlflow params never change
    csv_curve = [(epoch, row["val/nelbo"]) for epoch, row in sorted(rows.items())]
    assert metric_history(tmp, before, "val/nelbo") == csv_curve
