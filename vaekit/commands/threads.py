"""CPU threads of a job that runs beside others (hydra/launcher=joblib).

Each of torch's intra-op thread pools would take every core; n jobs side by side would then run
n x cores threads, and oversubscribed OpenMP threads made steps many times slower on small
machines. So when `trainer.num_threads` is unset, each job takes cores / parallel jobs threads.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("vaekit")

PARALLEL_LAUNCHERS = ("JoblibLauncher",)  # launchers whose jobs share this machine's cores


def parallel_jobs(n_jobs: int, cores: int) -> int:
    """How many jobs joblib runs at once for its `n_jobs` (-1: one per core, -2: all but one)."""
    resolved = n_jobs if n_jobs > 0 else cores + 1 + n_jobs
    return max(1, min(resolved, cores))


def job_threads(launcher: Any, cores: int) -> tuple[int, int] | None:
    """(threads per job, parallel jobs) under a launcher config that runs jobs side by side on
    this machine; None under any other launcher (one job at a time, or one machine per job)."""
    target = str(launcher.get("_target_", "")) if launcher is not None else ""
    if not target.endswith(PARALLEL_LAUNCHERS):
        return None
    parallel = parallel_jobs(int(launcher.get("n_jobs", -1)), cores)
    return max(1, cores // parallel), parallel


def set_job_threads(num_threads: int | None, hydra_cfg: Any) -> None:
    """Give this job its share of the cores when jobs run side by side and the user set no
    `trainer.num_threads` (which `train` applies itself); the choice is logged."""
    if num_threads is not None:
        return
    import joblib  # scikit-learn's dependency; counts the cores this process may use, as joblib does
    import torch

    cores = joblib.cpu_count()
    found = job_threads(hydra_cfg.get("launcher"), cores)
    if found is None:
        return
    threads, parallel = found
    torch.set_num_threads(threads)
    log.info(
        "%d jobs side by side on %d cores: %d thread(s) per job (trainer.num_threads sets another number)",
        parallel,
        cores,
        threads,
    )
