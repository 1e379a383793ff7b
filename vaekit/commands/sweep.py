"""The end-of-sweep summary of `vaekit train -m`: which jobs failed, read from their run
directories, so it holds whichever launcher ran the jobs (in this process, joblib, SLURM)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

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
