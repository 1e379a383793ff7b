"""`logger=csv`: plain CSV files in the run directory, readable without any dependency.

`<run_dir>/metrics.csv` holds one row per epoch: `epoch` and a column per scalar tag
(train/nelbo, val/nelbo, train/kl/z1, ...; empty where an epoch did not log that tag).
`<run_dir>/final_metrics.csv` holds one row: the run's settings and its final metrics.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from vaekit.loggers.base import Logger

EPOCHS_FILE = "metrics.csv"
FINAL_FILE = "final_metrics.csv"


class CsvLogger(Logger):
    """Keeps the rows in memory and rewrites metrics.csv (atomically) whenever they change:
    a column can appear late (train/rollbacks), and a killed run leaves a complete file."""

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        # purge_step: a resumed run keeps the earlier rows before this epoch and drops the rest
        # (logged after the last checkpoint), so no epoch appears twice
        self.run_dir = run_dir
        self.rows: dict[int, dict[str, float]] = {}
        if purge_step is not None:
            earlier = read_rows(run_dir / EPOCHS_FILE)
            self.rows = {step: row for step, row in earlier.items() if step < purge_step}

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        self.rows.setdefault(step, {}).update({f"{prefix}/{name}": float(v) for name, v in values.items()})
        columns = list(dict.fromkeys(name for row in self.rows.values() for name in row))
        table = [[step, *(row.get(name, "") for name in columns)] for step, row in sorted(self.rows.items())]
        write_atomic(self.run_dir / EPOCHS_FILE, [["epoch", *columns], *table])

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        record = {**hparams, **metrics}
        write_atomic(self.run_dir / FINAL_FILE, [list(record), list(record.values())])


def read_rows(path: Path) -> dict[int, dict[str, float]]:
    """The rows of an earlier metrics.csv by epoch ({} when there is none)."""
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        return {
            int(row.pop("epoch")): {name: float(v) for name, v in row.items() if v != ""}
            for row in csv.DictReader(handle)
        }


def write_atomic(path: Path, rows: list[list[Any]]) -> None:
    """Write the rows to a temporary file, then move it over `path`: readers never see half a
    file. Floats are written as str() writes them, which float() reads back exactly."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    os.replace(temporary, path)
