"""Benchmark: what a `vaekit train` run spends after its last epoch, against its training time.

Runs the real command (MNIST, MLP, latent 40, 3 epochs, k = 100 by default; digits with
--digits) and reports: the training time (metrics.json's train_seconds), the time from the
end of training (the last epoch's last.pt) to the process exit, their ratio, and each stage
after training as the run logged it (`seconds_after_training`).

    python scripts/bench_after_training.py --root ../shared/data
    python scripts/bench_after_training.py --digits          # the default run, k = 1000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data")
    parser.add_argument("--digits", action="store_true", help="the default digits run instead of MNIST")
    args = parser.parse_args()
    if args.digits:
        overrides = []
    else:
        if not (Path(args.root) / "MNIST" / "raw").is_dir():
            raise SystemExit(f"MNIST not found under {args.root}/MNIST/raw: pass --root.")
        overrides = [
            "dataset=mnist",
            f"dataset.root={Path(args.root).resolve()}",
            "model.latent_dim=40",
            "trainer.max_epochs=3",
            "eval.iw_samples=100",
        ]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        command = ["vaekit", "train", *overrides, "trainer.progress=false", f"hydra.run.dir={run_dir}"]
        started = time.time()
        subprocess.run(command, check=True, capture_output=True, text=True)
        ended = time.time()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        training_ended = (run_dir / "last.pt").stat().st_mtime
    train, after = metrics["train_seconds"], ended - training_ended
    print(f"{'digits' if args.digits else 'MNIST MLP latent 40'}: command {ended - started:.1f} s")
    print(f"training {train:.2f} s, after training {after:.2f} s, ratio {after / train:.2f}")
    laps = metrics["seconds_after_training"]
    stages = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in laps.items())
    print(f"stages: {stages}; the rest (metrics.json, loggers, exit) {after - sum(laps.values()):.2f} s")


if __name__ == "__main__":
    main()
