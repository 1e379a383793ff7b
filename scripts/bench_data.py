"""Streaming vs in-memory: one MNIST training epoch on each data path, in the same process,
with the same seed (default MLP VAE, Bernoulli likelihood with dynamic binarization).

    python scripts/bench_data.py --root ../shared/data [--rounds 2] [--workers 0]

Prints each path's epoch time (the fastest of `rounds`, run in alternation), their ratio, and
whether the two epochs' summed training NELBO agree bit for bit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from vaekit.build import build
from vaekit.training.flatten import FlatParameters


def compose(*overrides: str):
    """The config `vaekit train OVERRIDES` composes (no run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from vaekit.commands.train import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def one_epoch(root: str, in_memory: bool, workers: int) -> tuple[float, float]:
    """(seconds, summed training NELBO) of one epoch from seed 0 on one data path."""
    cfg = compose("dataset=mnist", f"dataset.root={root}", f"data.in_memory={str(in_memory).lower()}",
                  f"data.num_workers={workers}")  # fmt: skip
    torch.manual_seed(0)
    built = build(cfg, torch.device("cpu"))
    model, data = built.model, built.data
    flat = FlatParameters(model)
    optimizer = torch.optim.Adamax([flat.param], lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    total = torch.zeros(())
    start = time.perf_counter()
    perm = data.permutation(generator)
    for step in range(data.num_train_batches(64)):
        x = data.train_batch(perm, step, 64, generator)
        elbo = model(x, beta=1.0, free_bits=0.0)
        flat.zero_grad()
        elbo.loss.mean().backward()
        optimizer.step()
        total += elbo.nelbo.detach().sum()
    return time.perf_counter() - start, float(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data", help="the folder holding MNIST/raw")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the streaming path")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not (Path(args.root) / "MNIST" / "raw").is_dir():
        sys.exit(f"no MNIST under {args.root}/MNIST/raw: pass --root")
    torch.set_num_threads(args.threads)
    times: dict[bool, list[float]] = {True: [], False: []}
    nelbo: dict[bool, float] = {}
    for _ in range(args.rounds):
        for in_memory in (True, False):
            seconds, nelbo[in_memory] = one_epoch(args.root, in_memory, args.workers)
            times[in_memory].append(seconds)
    resident, streamed = min(times[True]), min(times[False])
    print(f"in memory   {resident:6.2f} s per epoch")
    print(f"streamed    {streamed:6.2f} s per epoch ({args.workers} workers)")
    print(f"streamed / in memory: x{streamed / resident:.3f}")
    verdict = "identical" if nelbo[True] == nelbo[False] else "DIFFERENT"
    print(f"summed training NELBO {nelbo[True]:.6f} vs {nelbo[False]:.6f}: {verdict}")


if __name__ == "__main__":
    main()
