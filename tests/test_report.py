"""`vaekit report` over a real two-job sweep plus a failed and an unfinished job."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, run_vaekit
from PIL import Image

from vaekit import cli
from vaekit.commands.report import RunRecord, collect, markdown, read_curve
from vaekit.runs import find_runs

FAILURE = "model.latent_dim must be at least 1, not 0."


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 2-job multirun (latent 2 and 3), a failed job 2 and a job 3 still running."""
    tmp = tmp_path_factory.mktemp("report")
    folder = tmp / "sweep"
    done = run_vaekit("train", "-m", "model.latent_dim=2,3", *FAST, f"hydra.sweep.dir={folder}", cwd=tmp)
    assert done.returncode == 0, done.stderr
    overrides = (folder / "0" / ".hydra" / "overrides.yaml").read_text()
    failed = folder / "2"
    shutil.copytree(folder / "0" / ".hydra", failed / ".hydra")
    (failed / ".hydra" / "overrides.yaml").write_text(overrides.replace("latent_dim=2", "latent_dim=0"))
    (failed / "metrics.json").write_text(json.dumps({"status": "failed", "reason": FAILURE, "seconds": 0.1}))
    running = folder / "3"
    shutil.copytree(folder / "1" / ".hydra", running / ".hydra")
    (running / ".hydra" / "overrides.yaml").write_text(overrides.replace("latent_dim=2", "latent_dim=4"))
    return folder


def test_report_lists_every_job_sorted_by_test_iw_nll(sweep: Path):
    done = run_vaekit("report", str(sweep), cwd=sweep.parent)
    assert done.returncode == 0, done.stderr
    metrics = {job: json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1")}
    finished = sorted(("0", "1"), key=lambda job: metrics[job]["test_iw_nll"])

    runs_part = done.stdout.split("\nruns:\n", 1)[1]  # below the group table
    table = [line for line in runs_part.splitlines() if line.startswith("| ")]
    header, *rows = ([cell.strip() for cell in line.split("|")[1:-1]] for line in table)
    assert header[:3] == ["run", "model.latent_dim", "status"] and "test IW-NLL" in header
    assert [row[0] for row in rows] == [*finished, "3", "2"]  # finished by IW-NLL, running, failed
    by_run = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert by_run["0"]["model.latent_dim"] == "2" and by_run["1"]["model.latent_dim"] == "3"
    for job in ("0", "1"):
        assert by_run[job]["status"] == "finished"
        assert by_run[job]["test IW-NLL"] == f"{metrics[job]['test_iw_nll']:.2f}"
    assert by_run["2"]["status"] == "failed" and by_run["2"]["note"] == FAILURE
    assert by_run["3"]["status"] == "running" and by_run["3"]["test IW-NLL"] == ""
    assert "common overrides:" in done.stdout and "trainer.max_epochs=3" in done.stdout

    with (sweep / "report.csv").open(newline="") as handle:
        records = list(csv.DictReader(handle))
    assert [r["run"] for r in records] == [*finished, "3", "2"]
    for record in records[:2]:
        assert math.isclose(float(record["test_iw_nll"]), metrics[record["run"]]["test_iw_nll"])
    assert records[3]["status"] == "failed" and records[3]["note"] == FAILURE
    assert records[2]["status"] == "running" and records[2]["test_iw_nll"] == ""

    pixels = np.asarray(Image.open(sweep / "report_curves.png").convert("RGB"), dtype=np.float64)
    assert pixels.shape == (550, 900, 3) and pixels.std() > 0


def test_validation_curves_are_read_from_the_event_files(sweep: Path):
    curve = read_curve(sweep / "0")
    assert [step for step, _ in curve] == [1, 2, 3]
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert math.isclose(min(value for _, value in curve), metrics["val_nelbo"], rel_tol=1e-5)
    assert read_curve(sweep / "3") == []  # no event files yet


def test_runs_are_found_in_any_folder_and_in_job_order(sweep: Path, tmp_path: Path):
    assert [p.name for p in find_runs(sweep)] == ["0", "1", "2", "3"]
    assert find_runs(sweep / "1") == [sweep / "1"]  # a run itself
    nested = tmp_path / "outputs" / "multirun" / "day" / "time"
    for job in ("10", "2"):
        (nested / job / ".hydra").mkdir(parents=True)
    assert [p.name for p in find_runs(tmp_path / "outputs")] == ["2", "10"]  # 2 before 10
    assert [r.status for r in collect(tmp_path / "outputs")] == ["running", "running"]


def test_markdown_keeps_runs_without_numbers(tmp_path: Path):
    records = [
        RunRecord(tmp_path, "b", {"prior": "mog"}, "finished", {"test_iw_nll": float("nan")}),
        RunRecord(tmp_path, "a", {"prior": "standard"}, "unreadable", note="metrics.json: bad | json"),
    ]
    text = markdown(records)
    assert "| b | mog | finished | nan |" in text
    assert "metrics.json: bad \\| json" in text  # a pipe in a note does not break the table


def test_report_refuses_folders_without_runs(tmp_path: Path, capsys):
    for folder, message in ((tmp_path, "No vaekit runs under"), (tmp_path / "nowhere", "does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["report", str(folder)])
        assert exit_info.value.code == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("vaekit: error: ") and message in line
