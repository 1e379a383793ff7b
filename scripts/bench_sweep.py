"""Benchmark: a digits seed sweep run one job after another vs side by side (hydra/launcher=joblib).

Both sweeps are the real command, timed from launch to exit (start-up, training, the final
evaluation included): first `vaekit train -m trainer.seed=0,...` (Hydra's basic launcher, torch's
default threads), then the same with `hydra/launcher=joblib hydra.launcher.n_jobs=J` (each job
takes cores / J threads). Prints both walls, their ratio (target: at most 0.6 with 4 seeds and
2 jobs on a 2-core machine) and each seed's test NELBO under both (equal within 0.05 nats).

    python scripts/bench_sweep.py [--seeds 4] [--jobs 2] [OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOLERANCE = 0.05  # nats: thread counts differ, so the float sums (and the runs) differ slightly
TARGET = 0.6


def sweep(sweep_dir: Path, seeds: int, extra: list[str]) -> float:
    """Run one sweep over `seeds` seeds into sweep_dir; its wall-clock seconds."""
    vaekit = str(Path(sys.executable).parent / "vaekit")
    seed_list = ",".join(str(seed) for seed in range(seeds))
    cmd = [vaekit, "train", "-m", f"trainer.seed={seed_list}", "trainer.progress=false", *extra,
           f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"the sweep failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return seconds


def test_nelbo(sweep_dir: Path, seeds: int) -> list[float]:
    """Each job's test NELBO, by seed (job N ran seed N)."""
    paths = [sweep_dir / str(job) / "metrics.json" for job in range(seeds)]
    return [json.loads(path.read_text())["test_nelbo"] for path in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2, help="jobs side by side under joblib (default 2)")
    parser.add_argument("overrides", nargs="*", help="more overrides for both sweeps")
    args = parser.parse_args()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    if env_threads:  # it would cap the sequential sweep's threads too: not the comparison asked for
        print(f"note: OMP_NUM_THREADS={env_threads} is set", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        sequential = sweep(Path(tmp) / "sequential", args.seeds, args.overrides)
        print(f"sequential ({args.seeds} seeds, one after another): {sequential:.1f} s", flush=True)
        parallel_extra = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}", *args.overrides]
        parallel = sweep(Path(tmp) / "joblib", args.seeds, parallel_extra)
        print(f"joblib ({args.jobs} jobs side by side, {os.cpu_count()} cores): {parallel:.1f} s", flush=True)
        ratio = parallel / sequential
        met = "met" if ratio <= TARGET else "MISSED"
        print(f"ratio joblib/sequential: {ratio:.2f}x (target <= {TARGET}x: {met})")
        worst = 0.0
        one_by_one = test_nelbo(Path(tmp) / "sequential", args.seeds)
        side_by_side = test_nelbo(Path(tmp) / "joblib", args.seeds)
        for seed, (a, b) in enumerate(zip(one_by_one, side_by_side, strict=True)):
            worst = max(worst, abs(a - b))
            print(f"seed {seed}: test NELBO {a:.3f} sequential, {b:.3f} joblib (difference {abs(a - b):.3f})")
        verdict = "equal" if worst <= TOLERANCE else "NOT equal"
        print(f"largest difference {worst:.3f} nats: {verdict} within {TOLERANCE} nats")


if __name__ == "__main__":
    main()
