"""Benchmark: training epochs with trainer.precision=bf16-mixed against float32, in one process.

Both trainers train the same model (same initial weights, same data stream) on the device of
`trainer.device`; their epochs (training steps only: `Trainer._train_epoch`, no validation or
checkpoints) alternate, so a machine that slows down mid-run slows both. Prints the median
seconds per epoch of each and the ratio bf16 / fp32 (below 1: bf16 is faster).

    python scripts/bench_precision.py [--epochs 5] [--rounds 5] [--threads 1] [extra overrides]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from vaekit.build import build_dataset, build_model, device_data, instantiate_group, resolve_device
from vaekit.commands.train import CONFIG_DIR
from vaekit.loggers.base import Logger
from vaekit.training.flatten import FlatParameters
from vaekit.training.precision import Precision, check_precision
from vaekit.training.signals import StopRequest
from vaekit.training.trainer import Trainer


class NoLogger(Logger):
    """Records nothing: the benchmark times the steps."""

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        pass

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        pass


def make_trainer(cfg, raw, device: torch.device, precision: str, run_dir: Path) -> Trainer:
    """A trainer of the configured model from the same initial weights, in `precision`."""
    torch.manual_seed(0)
    model = build_model(cfg, raw).to(device)
    data = device_data(raw, model, device, cfg.get("data"))
    flat = FlatParameters(model)
    optimizer = instantiate_group(cfg.optimizer, "optimizer", params=[flat.param])
    return Trainer(
        model, flat, optimizer, data, cfg.trainer, run_dir, NoLogger(), {}, StopRequest(),
        cfg.eval.batch_size, precision=Precision(precision, device),
    )  # fmt: skip


def epoch_seconds(trainer: Trainer, epochs: int) -> float:
    """Seconds per training epoch, median of `epochs`."""
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        trainer._train_epoch()
        if trainer.data.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs per round and precision")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="vaekit train overrides, e.g. net=conv")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.progress=false", *args.overrides])
    device = resolve_device(cfg.trainer.device)
    check_precision("bf16-mixed", device)
    raw = build_dataset(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: make_trainer(cfg, raw, device, name, Path(tmp)) for name in ("32", "bf16-mixed")}
        for trainer in trainers.values():  # warm-up: first-call costs
            trainer._train_epoch()
        seconds: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                seconds[name].append(epoch_seconds(trainer, args.epochs))
    fp32, bf16 = statistics.median(seconds["32"]), statistics.median(seconds["bf16-mixed"])
    print(f"device {device} ({torch.get_num_threads()} threads), {' '.join(args.overrides) or 'defaults'}")
    print(f"fp32       {fp32 * 1e3:8.1f} ms per epoch")
    print(f"bf16-mixed {bf16 * 1e3:8.1f} ms per epoch")
    print(f"ratio bf16/fp32: {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
