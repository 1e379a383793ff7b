"""`vaekit report`: compare every run under a folder (a multirun sweep, or outputs/).

Runs whose overrides differ only in the seed form a group (vaekit/evaluation/compare.py):
mean +- standard error and n per metric, paired differences against a `--baseline` group
(vaekit/commands/tables.py). Below, one row per run: its command-line overrides
(.hydra/overrides.yaml), status and final test metrics (metrics.json), sorted by test IW-NLL,
also written to report.csv. report_curves.png plots each group's validation NELBO against
epoch (mean over seeds, +- one standard error). Failed runs and runs still in progress are
listed with their status, never averaged in.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaekit.commands.tables import FORMATS, as_csv, as_json, as_latex, as_markdown, compare
from vaekit.errors import VaekitError
from vaekit.evaluation.compare import SEED_KEYS, normalized, summarize
from vaekit.runs import find_runs

METRIC_COLUMNS = (  # (key in metrics.json, markdown heading, format)
    ("test_iw_nll", "test IW-NLL", ".2f"),
    ("test_nelbo", "test NELBO", ".2f"),
    ("test_bpd", "bits/dim", ".4f"),
    ("val_best", "best val", ".2f"),  # what early stopping watched: NELBO unless the note says
    ("best_epoch", "best epoch", "d"),
    ("epochs", "epochs", "d"),
    ("iw_samples", "k", "d"),
    ("train_seconds", "train s", ".1f"),
)
CURVE_TAG = "val/nelbo"
STATUS_ORDER = {"finished": 0, "early_stopped": 0, "running": 1, "failed": 2}
CONDITIONAL_NOTE = "(conditional: log p(x|y))"  # the note of a model.conditional=true run's row
VAL_NAMES = {"iwae": "IWAE bound", "nll": "NLL by a short AIS"}  # `stopped_on` other than nelbo


@dataclass
class RunRecord:
    """What the report knows about one run directory."""

    path: Path
    name: str  # path relative to the report folder
    overrides: dict[str, str]
    status: str  # finished, early_stopped, failed, running, ... (from metrics.json)
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # the failure reason, or why there are no metrics
    seed: tuple[str, ...] = ()  # the value of each seed key: runs with equal seeds are paired
    dataset: str = ""  # dataset.name of the run's config

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


def read_config(run_dir: Path) -> Any:
    """The run's composed config (.hydra/config.yaml), or None when it is missing or damaged."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    except Exception:  # a damaged or missing file should not hide the run
        return None


def seed_of(config: Any, overrides: dict[str, str], seed_keys: Sequence[str]) -> tuple[str, ...]:
    """Each seed key's value: the override, else the run's config (trainer.seed defaults to 0)."""
    from omegaconf import OmegaConf

    items = {normalized(key): value for key, value in overrides.items()}
    values = []
    for key in seed_keys:
        found = OmegaConf.select(config, key, default=None) if config is not None else None
        values.append(items.get(key, "" if found is None else str(found)))
    return tuple(values)


def read_record(run_dir: Path, root: Path, seed_keys: Sequence[str] = SEED_KEYS) -> RunRecord:
    """One run's overrides, seed, status and metrics; no metrics.json means it is still running."""
    record = _read_metrics(run_dir, root)
    config = read_config(run_dir)
    record.seed = seed_of(config, record.overrides, seed_keys)
    record.dataset = str(config.get("dataset", {}).get("name", "")) if config is not None else ""
    return record


def _read_metrics(run_dir: Path, root: Path) -> RunRecord:
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
    watched = str(metrics.get("stopped_on", "nelbo"))  # the validation number early stopping watched
    metrics.setdefault("val_best", metrics.get(f"val_{watched}"))
    notes = [str(metrics.get("reason", ""))] if status == "failed" else []
    notes += estimator_notes(metrics, watched)
    return RunRecord(run_dir, name, overrides, status, metrics, "; ".join(note for note in notes if note))


def estimator_notes(metrics: dict[str, Any], watched: str) -> list[str]:
    """What a row's numbers are when they are not the VAE defaults: a conditional likelihood,
    the IW-NLL column estimated by AIS (model=rbm), a validation number other than the NELBO."""
    notes = []
    if metrics.get("conditional") is True:  # model.conditional=true: not comparable with log p(x)
        notes.append(CONDITIONAL_NOTE)
    if metrics.get("test_estimator") == "ais":
        stderr = metrics.get("test_iw_nll_stderr")
        error = f" +- {stderr:.2f}" if isinstance(stderr, (int, float)) else ""
        notes.append(f"IW-NLL by AIS{error} ({metrics.get('test_ais_chains')} chains)")
    if watched != "nelbo":
        notes.append(f"best val: {VAL_NAMES.get(watched, watched)}")
    return notes


def collect(root: Path, seed_keys: Sequence[str] = SEED_KEYS) -> list[RunRecord]:
    """Every run under `root`, best test IW-NLL first; runs without metrics after them."""
    if not root.is_dir():
        raise VaekitError(f"{root} is not a directory." if root.exists() else f"{root} does not exist.")
    runs = find_runs(root)
    if not runs:
        raise VaekitError(f"No vaekit runs under {root} (no folder with .hydra/, metrics.json or best.pt).")
    records = [read_record(run, root, seed_keys) for run in runs]
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


SEARCH_RESULTS = "optimization_results.yaml"  # what hydra-optuna-sweeper writes into its sweep folder


def _job_order(record: RunRecord) -> list[tuple[int, int, str]]:
    """Sort job 2 before job 10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in Path(record.name).parts]


def search_section(root: Path, records: list[RunRecord]) -> str:
    """For an Optuna sweep (root holds optimization_results.yaml): the best value and its
    parameters, then every trial in job order with its parameters (the job's overrides),
    status and best validation NELBO, the value the search minimized. '' for other folders."""
    from omegaconf import OmegaConf

    try:
        results = OmegaConf.to_container(OmegaConf.load(root / SEARCH_RESULTS))
    except Exception:  # no search here, or a damaged file: the report shows the runs as always
        return ""
    if not isinstance(results, dict):
        return ""
    trials = sorted(records, key=_job_order)
    keys, common = varying_keys(trials)
    ended = sum(record.status in ("finished", "early_stopped") for record in trials)
    best = " ".join(f"{key}={value}" for key, value in (results.get("best_params") or {}).items())
    lines = [
        f"Optuna search: {len(trials)} trials, {ended} ended well, {len(trials) - ended} failed; best "
        f"validation NELBO {_format(results.get('best_value'), '.2f')} with {best or 'no parameters'}",
        "",
    ]
    if common:
        lines += ["common overrides: " + " ".join(f"{k}={v}" for k, v in common.items()), ""]
    headings = ["trial", *keys, "status", "best val", "note"]
    lines.append("| " + " | ".join(headings) + " |")
    lines.append("|" + "|".join("---" for _ in headings) + "|")
    for record in trials:
        note = (record.note or str(record.metrics.get("reason", ""))).replace("|", "\\|")
        values = [record.overrides.get(key, "") for key in keys]
        val = _format(record.metrics.get("val_best"), ".2f")
        lines.append("| " + " | ".join([record.name, *values, record.status, val, note]) + " |")
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


def group_curve(records: Sequence[RunRecord]) -> list[tuple[int, float, float]]:
    """(epoch, mean, standard error) of the runs' validation NELBO at each epoch some run has
    (se nan where only one run reached the epoch)."""
    by_epoch: dict[int, list[float]] = {}
    for record in records:
        for step, value in read_curve(record.path):
            by_epoch.setdefault(step, []).append(value)
    return [(step, (s := summarize(values)).mean, s.sem) for step, values in sorted(by_epoch.items())]


def check_one_dataset(records: Sequence[RunRecord], root: Path) -> None:
    """Runs of different datasets are never averaged or paired: one sentence."""
    names = sorted({record.dataset for record in records if record.dataset})
    if len(names) > 1:
        raise VaekitError(
            f"The runs under {root} used different datasets ({', '.join(names)}), whose numbers "
            f"cannot be averaged or compared: report each dataset's runs on their own."
        )


def check_one_test_set(records: Sequence[RunRecord], root: Path) -> None:
    """Runs scored on different test sets (the checksum train writes into metrics.json) are
    never ranked together: one sentence naming two of them."""
    first: dict[str, RunRecord] = {}
    for record in records:
        checksums = record.metrics.get("data_checksums")
        test = checksums.get("test") if isinstance(checksums, dict) else None
        if not isinstance(test, str):
            continue  # runs of older vaekit versions recorded none
        other = next(iter(first.values()), None)
        if other is not None and test not in first:
            raise VaekitError(
                f"{other.name} and {record.name} under {root} were scored on different test sets "
                f"(their test splits' checksums differ: changed data files), so their numbers "
                f"cannot be ranked together."
            )
        first.setdefault(test, record)


def report(
    root: Path,
    by: str | None = None,
    seed_keys: Sequence[str] = (),
    baseline: str | None = None,
    fmt: str = "markdown",
) -> tuple[str, Path, Path]:
    """The report of every run under root: (text in `fmt`, report.csv path, report_curves.png
    path). Everything is checked before a file is written."""
    from vaekit.commands.figures import save_curves

    if fmt not in FORMATS:
        raise VaekitError(f"--format must be one of {', '.join(FORMATS)}, not {fmt}.")
    root = Path(root)
    records = collect(root, (*SEED_KEYS, *(normalized(k) for k in seed_keys)))
    check_one_dataset(records, root)
    check_one_test_set(records, root)
    comparison = compare(records, seed_keys, by, baseline)
    search = search_section(root, records) if fmt == "markdown" else ""
    search_first = f"{search}\n\n" if search else ""
    text = {
        "markdown": lambda: search_first + as_markdown(comparison) + "\n\nruns:\n\n" + markdown(records),
        "csv": lambda: as_csv(comparison),
        "json": lambda: as_json(comparison),
        "latex": lambda: as_latex(comparison),
    }[fmt]()
    csv_path = write_csv(records, root / "report.csv")
    curves = {group.label: group_curve(group.runs) for group in comparison.groups}
    title = f"validation NELBO of {len(comparison.groups)} group(s) under {root.resolve().name}"
    png_path = save_curves(curves, root / "report_curves.png", title, "validation NELBO (nats)")
    return text, csv_path, png_path
