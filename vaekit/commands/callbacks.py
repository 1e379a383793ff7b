"""Hydra callbacks of `vaekit train`: the output directory checked before Hydra creates it, and
the end-of-sweep summary of failed jobs, read from their run directories (so it holds whichever
launcher ran the jobs: in this process, joblib, SLURM)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vaekit.errors import VaekitError
from vaekit.runs import find_runs

FAILED_STATUSES = ("failed", "diverged")


def failed_jobs(sweep_dir: Path) -> list[str]:
    """One line per job under `sweep_dir` whose metrics.json is missing, unreadable, or says
    failed or diverged: 'job N (DIR): reason'."""
    lines = []
    for run_dir in find_runs(sweep_dir):
        path = run_dir / "metrics.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            lines.append(f"job {run_dir.name} ({run_dir}): it left no readable metrics.json")
            continue
        status = record.get("status") if isinstance(record, dict) else None
        if status in FAILED_STATUSES:
            lines.append(
                f"job {run_dir.name} ({run_dir}): {status}: {record.get('reason', 'no reason given')}"
            )
    return lines


class SweepSummary(Callback):
    """Hydra callback: after a multirun, name every failed job and exit 1 if there was one."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        lines = failed_jobs(sweep_dir) if sweep_dir.is_dir() else []
        if not lines:
            return
        print(f"vaekit: {len(lines)} sweep job(s) failed:", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
        sys.exit(1)


MAX_NAME_BYTES = 255  # the longest file name common file systems take


def check_output_dir(path: Path, setting: str) -> None:
    """Refuse, in one sentence, a directory that cannot hold a run: a file, under a file, a name
    too long, or under a folder this user cannot write."""
    if any(len(part.encode()) > MAX_NAME_BYTES for part in path.parts):
        raise VaekitError(
            f"{setting}={path} has a name longer than {MAX_NAME_BYTES} bytes, too long for a file."
        )
    if path.exists() and not path.is_dir():
        raise VaekitError(f"{setting}={path} is a file, not a directory: choose another {setting}.")
    existing = next((parent for parent in (path, *path.parents) if parent.exists()), Path("/"))
    if not existing.is_dir():
        raise VaekitError(f"{setting}={path} lies under the file {existing}: choose another {setting}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise VaekitError(f"{setting}={path} cannot be written: {existing} is not writable for this user.")


def check_resume_target(resume: Path) -> None:
    """resume= must name a run directory with a last.pt; anything else is refused before Hydra
    creates a file there."""
    if not resume.exists():
        raise VaekitError(f"resume={resume} does not exist: pass the directory of a vaekit train run.")
    if not resume.is_dir() or not (resume / "last.pt").is_file():
        raise VaekitError(
            f"resume={resume} holds no last.pt, so there is nothing to resume: "
            f"pass the directory of a vaekit train run."
        )
    if not os.access(resume, os.W_OK | os.X_OK):
        raise VaekitError(f"resume={resume} is not writable for this user, so the run cannot continue there.")


def _refuse(error: VaekitError) -> None:
    """One sentence and exit 1: a callback's exception would reach Hydra's traceback printer."""
    print(f"vaekit: error: {error}", file=sys.stderr, flush=True)
    sys.exit(1)


class OutputDirCheck(Callback):
    """Hydra callback: check the run or sweep directory before Hydra creates anything in it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            if config.get("resume"):
                check_resume_target(Path(config.resume))
            else:
                check_output_dir(Path(config.hydra.run.dir), "hydra.run.dir")
        except VaekitError as error:
            _refuse(error)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_output_dir(Path(config.hydra.sweep.dir), "hydra.sweep.dir")
        except VaekitError as error:
            _refuse(error)
