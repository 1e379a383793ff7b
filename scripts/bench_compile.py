"""Benchmark: trainer.compile=true against eager, seconds per epoch of Trainer.fit.

For each setup (digits MLP; MNIST MLP and MNIST conv when --root holds MNIST) the same model,
seed and data are fitted once eager and once with torch.compile of the forward pass: one
epoch first (it holds the compilation, reported apart), then --epochs more, timed. The two
runs alternate in one process; the script prints seconds per epoch, the ratio
compiled / eager, and the difference of the final validation NELBO (float noise only).

    python scripts/bench_compile.py [--root ../shared/data] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_epoch import compose_cfg

from vaekit.build import build_dataset, build_model, device_data, instantiate_group, resolve_device
from vaekit.loggers.tensorboard import RunLogger
from vaekit.training.flatten import FlatParameters
from vaekit.training.signals import StopRequest
from vaekit.training.trainer import Trainer


def fit_timed(cfg, raw, data, epochs: int, run_dir: Path) -> tuple[float, float, float]:
    """(seconds of the first epoch, seconds per later epoch, final validation NELBO)."""
    torch.manual_seed(0)
    model = build_model(cfg, raw).to(data.device)
    flat = FlatParameters(model)
    optimizer = instantiate_group(cfg.optimizer, "optimizer", params=[flat.param])
    logger = RunLogger(run_dir)
    trainer = Trainer(model, flat, optimizer, data, cfg.trainer, run_dir, logger, {}, StopRequest(), 1000)
    settings = trainer.settings  # the trainer's own copy of cfg.trainer
    settings.max_epochs = 1
    start = time.perf_counter()
    trainer.fit()
    first = time.perf_counter() - start
    settings.max_epochs = 1 + epochs
    start = time.perf_counter()
    trainer.fit()
    later = (time.perf_counter() - start) / epochs
    logger.close()
    return first, later, trainer.state.best_val


def bench(name: str, overrides: list[str], epochs: int) -> None:
    results = {}
    for compiled in (False, True):
        flags = [f"trainer.compile={str(compiled).lower()}", "trainer.log_images=false"]
        cfg = compose_cfg([*overrides, *flags])
        raw = build_dataset(cfg)
        device = resolve_device(cfg.trainer.device)
        data = device_data(raw, build_model(cfg, raw), device)
        with tempfile.TemporaryDirectory() as tmp:
            results[compiled] = fit_timed(cfg, raw, data, epochs, Path(tmp))
    (e_first, e_epoch, e_val), (c_first, c_epoch, c_val) = results[False], results[True]
    print(
        f"{name}: eager {e_epoch:.3f} s/epoch, compiled {c_epoch:.3f} s/epoch "
        f"(ratio {c_epoch / e_epoch:.2f}); first epoch {e_first:.1f} s eager, {c_first:.1f} s compiled; "
        f"val NELBO {e_val:.3f} vs {c_val:.3f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    common = ["trainer.progress=false", f"trainer.patience={args.epochs + 2}"]
    bench("digits MLP", common, args.epochs)
    if (Path(args.root) / "MNIST" / "raw").is_dir():
        mnist = [*common, "dataset=mnist", f"dataset.root={args.root}", "model.latent_dim=40"]
        bench("MNIST MLP", mnist, args.epochs)
        bench("MNIST conv", [*mnist, "net=conv"], args.epochs)
    else:
        print(f"MNIST not found under {args.root}/MNIST/raw: digits only.")


if __name__ == "__main__":
    main()
