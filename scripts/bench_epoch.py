"""Benchmark: one vaekit trainer epoch against a bare loop on the same model and tensors.

The trainer's epoch includes everything `vaekit train` does per epoch (dynamic binarization,
the non-finite guard, validation, TensorBoard scalars, image grids, last.pt / best.pt).
The bare loop is forward, backward and optimizer step over slices of a permutation of the
same device-resident tensors. Both alternate in one process; the script prints the median
seconds per epoch of each and their ratio (target: at most 1.0).

    python scripts/bench_epoch.py [--root ../shared/data] [--epochs 2] [--rounds 3] [extra overrides]
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
from vaekit.data import DeviceData
from vaekit.loggers.tensorboard import RunLogger
from vaekit.training.flatten import FlatParameters
from vaekit.training.signals import StopRequest
from vaekit.training.trainer import Trainer


def bare_epochs(cfg, raw, data: DeviceData, epochs: int) -> float:
    """Seconds per epoch of forward/backward/step only, on the same tensors."""
    torch.manual_seed(0)
    model = build_model(cfg, raw).to(data.device)
    # what a plain loop uses: torch's Adamax over the model's parameters (vaekit's default
    # optimizer is the same arithmetic on its one flat tensor)
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.optimizer.lr)
    generator = torch.Generator(device=data.device).manual_seed(1)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = data.permutation(generator)
        for step in range(data.num_train_batches(cfg.trainer.batch_size)):
            x = data.train_batch(perm, step, cfg.trainer.batch_size, generator)
            loss = model(x).loss.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if data.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / epochs


def trainer_epochs(cfg, raw, data: DeviceData, epochs: int, run_dir: Path) -> float:
    """Wall seconds per epoch of Trainer.fit, everything in it included (validation, logging,
    last.pt / best.pt until they are on disk)."""
    torch.manual_seed(0)
    model = build_model(cfg, raw).to(data.device)
    flat = FlatParameters(model)
    optimizer = instantiate_group(cfg.optimizer, "optimizer", params=[flat.param])
    logger = RunLogger(run_dir)
    stop = StopRequest()
    trainer = Trainer(
        model, flat, optimizer, data, cfg.trainer, run_dir, logger, {}, stop, cfg.eval.batch_size
    )
    start = time.perf_counter()
    state = trainer.fit()
    seconds = time.perf_counter() - start
    logger.close()
    return seconds / state.epoch


def compose_cfg(overrides: list[str]):
    """The config `vaekit train OVERRIDES` composes."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. net=conv")
    args = parser.parse_args()
    if not (Path(args.root) / "MNIST" / "raw").is_dir():
        raise SystemExit(f"MNIST not found under {args.root}/MNIST/raw: pass --root.")
    overrides = [
        "dataset=mnist",
        f"dataset.root={args.root}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.patience={args.epochs + 1}",
        "trainer.progress=false",
        *args.overrides,
    ]
    cfg = compose_cfg(overrides)
    raw = build_dataset(cfg)
    device = resolve_device(cfg.trainer.device)
    data = device_data(raw, build_model(cfg, raw), device)
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            bare.append(bare_epochs(cfg, raw, data, args.epochs))
            ours.append(trainer_epochs(cfg, raw, data, args.epochs, Path(tmp) / str(r)))
            print(f"round {r}: bare {bare[-1]:.3f} s/epoch, trainer {ours[-1]:.3f} s/epoch", flush=True)
    b, o = statistics.median(bare), statistics.median(ours)
    print(
        f"MNIST {' '.join(args.overrides) or 'MLP'} on {device}: bare {b:.3f} s/epoch, "
        f"trainer {o:.3f} s/epoch, ratio trainer/bare {o / b:.3f}"
    )


if __name__ == "__main__":
    main()
