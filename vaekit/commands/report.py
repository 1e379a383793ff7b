"""`vaekit report`: compare every run under a folder (a multirun sweep, or outputs/).

One row per run: its command-line overrides (.hydra/overrides.yaml), status and final test
metrics (metrics.json), sorted by test IW-NLL; printed as markdown, written to report.csv.
report_curves.png plots every run's validation NELBO against epoch (TensorBoard events).
Failed runs and runs still in progress are listed with their status, never dropped.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaekit.errors import VaekitError
from vaekit.runs import find_runs

METRIC_COLUMNS = (  # (key in metrics.json, markdown heading, format)
    ("test_iw_nll", "test IW-NLL", ".2f"),
    ("test_nelbo", "test NELBO", ".2f"),
    ("test_bpd", "bits/dim", ".4f"),
    ("val_nelbo", "best val NELBO", ".2f"),
    ("best_epoch", "best epoch", "d"),
    ("epochs", "epochs", "d"),
    ("iw_samples", "k", "d"),
    ("train_seconds", "train s", ".1f"),
)
CURVE_TAG = "val/nelbo"
STATUS_ORDER = {"finished": 0, "early_stopped": 0, "running": 1, "failed": 2}


@dataclass
class RunRecord:
    """What the report knows about one run directory."""

    path: Path
    name: str  # path relative to the report folder
    overrides: dict[str, str]
    status: str  # finished, early_stopped, failed, running, ... (from metrics.json)
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # the failure reason, or why there are no metrics

    @property
    def iw_nll(self) -> float:
        """Test IW-NLL, or +inf when the run has none (sorts last)."""
        value = self.metrics.get("test_iw_nll")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def read_overrides(run_dir: Path) -> dict[str, str]:
    """key -> value of the run's command-line overrides, in order ({} when not recorded)."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    try:
        items = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # a damaged file should not hide the run: show it without overrides
        return {}
    overrides: dict[str, str] = {}
    for item in items if isinstance(items, list) else []:
        key, _, value = str(item).partition("=")
        overrides[key] = value
    return overrides


def read_record(run_dir: Path, root: Path) -> RunRecord:
    """One run's overrides, status and metrics; no metrics.json means it is still running."""
    name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    overrides = read_overrides(run_dir)
    path = run_dir / "metrics.json"
    if not path.is_file():
        return RunRecord(run_dir, name, overrides, "running", note="no metrics.json yet (running or stopped)")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return RunRecord(run_dir, name, overrides, "unreadable", note=f"metrics.json: {error}")
    if not isinstance(metrics, dict):
        return RunRecord(run_dir, name, overrides, "unreadable", note="metrics.json is not an object")
    status = str(metrics.get("status", "finished"))
    note = str(metrics.get("reason", "")) if status == "failed" else ""
    return RunRecord(run_dir, name, overrides, status, metrics, note)


def collect(root: Path) -> list[RunRecord]:
    """Every run under `root`, best test IW-NLL first; runs without metrics after them."""
    if not root.is_dir():
        raise VaekitError(f"{root} is not a directory." if root.exists() else f"{root} does not exist.")
    runs = find_runs(root)
    if not runs:
        raise VaekitError(f"No vaekit runs under {root} (no folder with .hydra/, metrics.json or best.pt).")
    records = [read_record(run, root) for run in runs]
    return sorted(records, key=lambda r: (STATUS_ORDER.get(r.status, 3), r.iw_nll))


def varying_keys(records: list[RunRecord]) -> tuple[list[str], dict[str, str]]:
    """Override keys whose value differs between runs, and the overrides all runs share."""
    keys: list[str] = []
    for record in records:
        keys += [key for key in record.overrides if key not in keys]
    common = {}
    for key in keys:
        values = {record.overrides.get(key) for record in records}
        if len(values) == 1 and len(records) > 1:
            common[key] = next(iter(values))
    return [key for key in keys if key not in common], common


def _format(value: Any, spec: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    if spec == "d":
        return str(int(value)) if math.isfinite(value) else str(value)
    return format(value, spec) if math.isfinite(value) else str(value)


def markdown(records: list[RunRecord]) -> str:
    """The report as a markdown table (overrides that differ, status, metrics, note)."""
    keys, common = varying_keys(records)
    headings = ["run", *keys, "status", *(heading for _, heading, _ in METRIC_COLUMNS), "note"]
    rows = []
    for record in records:
        metrics = [_format(record.metrics.get(key), spec) for key, _, spec in METRIC_COLUMNS]
        overrides = [record.overrides.get(key, "") for key in keys]
        rows.append([record.name, *overrides, record.status, *metrics, record.note.replace("|", "\\|")])
    lines = []
    if common:
        lines += ["common overrides: " + " ".join(f"{k}={v}" for k, v in common.items()), ""]
    lines.append("| " + " | ".join(headings) + " |")
    lines.append("|" + "|".join("---" for _ in headings) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(records: list[RunRecord], path: Path) -> Path:
    """One row per run: every override key, status, note and every metric; full precision."""
    keys: list[str] = []
    metric_keys: list[str] = [key for key, _, _ in METRIC_COLUMNS]
    for record in records:
        keys += [key for key in record.overrides if key not in keys]
        metric_keys += [k for k in record.metrics if k not in metric_keys and k not in ("status", "reason")]
    header = ["run", *keys, "status", "note", *metric_keys]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for record in records:
            overrides = [record.overrides.get(key, "") for key in keys]
            metrics = [record.metrics.get(key, "") for key in metric_keys]
            writer.writerow([record.name, *overrides, record.status, record.note, *metrics])
    return path


def read_curve(run_dir: Path, tag: str = CURVE_TAG) -> list[tuple[int, float]]:
    """(epoch, value) of a scalar tag from the event files under run_dir/tb, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    folders = sorted({path.parent for path in (run_dir / "tb").rglob("events.out.tfevents.*")})
    for folder in folders:
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep all
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            points.update((event.step, event.value) for event in accumulator.Scalars(tag))
    return sorted(points.items())


def curve_label(record: RunRecord, keys: list[str]) -> str:
    """Legend entry: the run's name and the overrides that tell it apart."""
    differing = " ".join(f"{key}={record.overrides[key]}" for key in keys if key in record.overrides)
    suffix = "" if record.status in ("finished", "early_stopped") else f" [{record.status}]"
    return f"{record.name}: {differing}{suffix}" if differing else f"{record.name}{suffix}"


def report(root: Path) -> tuple[str, Path, Path]:
    """Build the report of every run under root: (markdown, report.csv path, report_curves.png path)."""
    from vaekit.commands.figures import save_curves

    root = Path(root)
    records = collect(root)
    keys, _ = varying_keys(records)
    csv_path = write_csv(records, root / "report.csv")
    curves = {curve_label(record, keys): read_curve(record.path) for record in records}
    title = f"validation NELBO of {len(records)} run(s) under {root.resolve().name}"
    png_path = save_curves(curves, root / "report_curves.png", title, "validation NELBO (nats)")
    return markdown(records), csv_path, png_path
