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

ENDED_WELL = {"finished": "finished", "early_stopped": "early-stopped"}  # status -> how the summary says it


def job_outcomes(sweep_dir: Path) -> list[tuple[Path, str, str]]:
    """(job directory, status, reason) of every job under `sweep_dir`, from its metrics.json;
    a job that left none (or an unreadable one) is 'failed' with that as its reason."""
    outcomes = []
    for run_dir in find_runs(sweep_dir):
        try:
            record = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            record = None
        if not isinstance(record, dict):
            outcomes.append((run_dir, "failed", "it left no readable metrics.json"))
            continue
        status = str(record.get("status", "finished"))
        outcomes.append((run_dir, status, str(record.get("reason", "no reason given"))))
    return outcomes


def failed_jobs(sweep_dir: Path) -> list[str]:
    """One line per job under `sweep_dir` that did not end well (failed, diverged, interrupted,
    no readable metrics.json): 'job N (DIR): status: reason'."""
    return [
        f"job {run_dir.name} ({run_dir}): {status}: {reason}"
        for run_dir, status, reason in job_outcomes(sweep_dir)
        if status not in ENDED_WELL
    ]


def summary(sweep_dir: Path) -> str:
    """'sweep of 4 jobs (DIR): 2 finished, 1 early-stopped, 1 failed'."""
    outcomes = job_outcomes(sweep_dir)
    counts = {**{word: 0 for word in ENDED_WELL.values()}, "failed": 0}
    for _, status, _ in outcomes:
        counts[ENDED_WELL.get(status, "failed")] += 1
    parts = ", ".join(f"{n} {word}" for word, n in counts.items())
    return f"sweep of {len(outcomes)} jobs ({sweep_dir}): {parts}"


class SweepSummary(Callback):
    """Hydra callback: after a multirun, count the jobs that finished, stopped early and failed,
    name every failed job with its reason, and exit 1 if there was one. Read from the job
    directories, so it holds whichever launcher ran the jobs (in this process, joblib, SLURM)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        print(f"vaekit: {summary(sweep_dir)}", flush=True)
        lines = failed_jobs(sweep_dir)
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
