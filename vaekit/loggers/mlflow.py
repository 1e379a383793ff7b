"""`logger=mlflow`: the run in an MLflow tracking store, beside (or instead of) TensorBoard.

Params are the flattened resolved config (`model.latent_dim`, `trainer.seed`, ...) plus the
group choices; metrics carry the TensorBoard tags (`train/nelbo`, `val/kl/z1`) with the epoch
as step, then the final metrics (`test_nelbo`, ...); artifacts are the image grids
(`images/samples_00010.png`) and, when the run finishes, best.pt. The run's id is kept in
`<run_dir>/mlflow_run.json`, so `vaekit train resume=RUN` continues the same MLflow run.
This module imports mlflow: it is imported only when `logger` names mlflow.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import Tensor

from vaekit.loggers.base import Logger

RUN_FILE = "mlflow_run.json"
DEFAULT_URI = "sqlite:///outputs/mlflow.db"  # mlflow 3 refuses plain-folder stores by default
BATCH = 100  # params per log_batch call: the most a tracking server accepts


class MlflowLogger(Logger):
    """One MLflow run per vaekit run, written through MlflowClient (no global active run, so
    several runs in one process, e.g. the Python API, do not interfere)."""

    def __init__(self, run_dir: Path, settings: Any, params: dict[str, Any], resumed: bool) -> None:
        self.run_dir = run_dir
        self.log_checkpoint = bool(settings.log_checkpoint)
        self.finished = False
        saved = run_dir / RUN_FILE
        if resumed and saved.is_file():  # continue the run, in the store it was started in
            record = json.loads(saved.read_text())
            self.client = MlflowClient(record["tracking_uri"])
            self.run_id = record["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            uri = tracking_uri(settings.tracking_uri)
            self.client = MlflowClient(uri)
            experiment_id = find_experiment(self.client, settings.experiment, artifact_location(uri))
            name = "/".join(run_dir.resolve().parts[-2:])  # e.g. 2026-12-01/21-14-27
            tags = {"vaekit.run_dir": str(run_dir.resolve())}
            self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
            saved.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")
        self.log_params(flat_params(params))

    def log_params(self, params: dict[str, str]) -> None:
        """Log the params the run lacks. MLflow never changes a logged param, so one that a
        resume changed (trainer.max_epochs) is recorded as the tag `vaekit.resumed.<key>`."""
        logged = self.client.get_run(self.run_id).data.params
        new = [Param(key, value) for key, value in params.items() if key not in logged]
        for start in range(0, len(new), BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + BATCH])
        for key, value in params.items():
            if key in logged and logged[key] != value:
                self.client.set_tag(self.run_id, f"vaekit.resumed.{key}", value)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        metrics = [Metric(f"{prefix}/{name}", float(v), stamp, step) for name, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def grids(self, grids: dict[str, Tensor], step: int) -> None:
        """Each grid as a PNG artifact, images/<name>_<step>.png."""
        from PIL import Image  # Pillow comes with matplotlib, a vaekit dependency

        with tempfile.TemporaryDirectory() as folder:
            for name, grid in grids.items():
                pixels = (grid.permute(1, 2, 0) * 255).round().clamp(0, 255).byte().numpy()
                path = Path(folder) / f"{name}_{step:05d}.png"
                Image.fromarray(pixels).save(path)
                self.client.log_artifact(self.run_id, str(path), artifact_path="images")

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """The group choices as params, the final metrics (step 0); the run has finished."""
        self.log_params(flat_params(hparams))
        stamp = int(time.time() * 1000)
        final = [Metric(name, float(value), stamp, 0) for name, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=final)
        self.finished = True

    def close(self) -> None:
        """Upload best.pt if the run finished; mark the run FINISHED, else KILLED (interrupted
        or diverged: a resume sets it running again)."""
        best = self.run_dir / "best.pt"
        if self.finished and self.log_checkpoint and best.is_file():
            self.client.log_artifact(self.run_id, str(best))
        self.client.set_terminated(self.run_id, status="FINISHED" if self.finished else "KILLED")


def tracking_uri(setting: str | None) -> str:
    """loggers.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else the local store under
    outputs/; a local SQLite path made absolute (so a resume from elsewhere finds it), its
    folder created."""
    uri = setting or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def artifact_location(uri: str) -> str | None:
    """For a local SQLite store, artifacts in `mlartifacts/` beside the database (mlflow's own
    default is relative to the working directory); a server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def find_experiment(client: MlflowClient, name: str, location: str | None) -> str:
    """The id of experiment `name`, created if missing."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another job of the sweep created it meanwhile
        return client.get_experiment_by_name(name).experiment_id


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"model": {"latent_dim": 16}} -> {"model.latent_dim": "16"}; lists stay one value."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
