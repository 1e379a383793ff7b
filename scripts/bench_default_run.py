"""Benchmark: the default `vaekit train` run against a plain PyTorch loop (scripts/plain_loop.py).

Both run as subprocesses, alternating, with the same seeds; each is timed from launch to
exit (start-up, training, test NELBO and IW-NLL with k = 1000 included). Prints per-run
figures and the median ratios vaekit / plain for time per epoch and total time.

    python scripts/bench_default_run.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stdout


def run_plain(seed: int) -> dict:
    seconds, out = timed([sys.executable, str(HERE / "plain_loop.py"), str(seed)])
    return {**json.loads(out.strip().splitlines()[-1]), "total_seconds": seconds}


def run_vaekit(seed: int, workdir: Path) -> dict:
    run_dir = workdir / f"seed{seed}"
    cmd = ["vaekit", "train", f"trainer.seed={seed}", f"hydra.run.dir={run_dir}", "trainer.progress=false"]
    seconds, _ = timed(cmd)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {**metrics, "total_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.rounds):
            plain, ours = run_plain(seed), run_vaekit(seed, Path(tmp))
            rows.append((plain, ours))
            for name, r in (("plain ", plain), ("vaekit", ours)):
                print(
                    f"seed {seed} {name}: {r['epochs']:4d} epochs  "
                    f"{1000 * r['seconds_per_epoch']:6.1f} ms/epoch  "
                    f"total {r['total_seconds']:5.1f} s  test NELBO {r['test_nelbo']:.2f}  "
                    f"IW-NLL {r['test_iw_nll']:.2f}",
                    flush=True,
                )
    epoch_ratio = statistics.median(o["seconds_per_epoch"] / p["seconds_per_epoch"] for p, o in rows)
    total_ratio = statistics.median(o["total_seconds"] / p["total_seconds"] for p, o in rows)
    print(
        f"median ratio vaekit/plain: time per epoch {epoch_ratio:.2f}, "
        f"total (command to final line) {total_ratio:.2f}"
    )


if __name__ == "__main__":
    main()
