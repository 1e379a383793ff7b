"""Benchmark: the test evaluation's importance-weighted pass against the arithmetic floor.

The floor is the matmul/conv FLOPs that the pass must do (encoder and decoder for every
(x, z) pair, counted by torch's FlopCounterMode on one call and scaled), divided by the
matmul throughput this machine measures (a large square matmul, best of 3, before and after the
pass; the floor uses the faster, so it is the lower bound). The pass
itself gives the IW-NLL and the NELBO with its terms (vaekit.evaluation.importance).

    python scripts/bench_iw.py                       # digits, default model, k = 1000
    python scripts/bench_iw.py --chunks              # also: decoder outputs per call 2**20..2**24
    python scripts/bench_iw.py --mnist ../shared/data --k 5000   # MNIST test set, MLP, latent 40
    python scripts/bench_iw.py --mnist ../shared/data --k 5000 --examples 1000   # a tenth of it
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

from vaekit.build import build
from vaekit.commands.train import CONFIG_DIR
from vaekit.evaluation.importance import default_chunk_elements, importance_estimates


def matmul_throughput(size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a float32 (size x size) @ (size x size) matmul, best of `repeats`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size**3 / best


def flops_per_pair(model: torch.nn.Module, x: torch.Tensor, draws: int = 64) -> float:
    """Counted FLOPs of one `weight_terms` call on 2 examples x `draws`, per (x, z) pair."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.weight_terms(x[:2], draws)
    return counter.get_total_flops() / (2 * draws)


def compose_run(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def bench(name: str, overrides: list[str], k: int, chunks: list[int | None], examples: int | None) -> None:
    built = build(compose_run(overrides), torch.device("cpu"))
    model, x = built.model.eval(), built.data.test[:examples]
    importance_estimates(model, x[:2], k, progress=False)  # warm-up: allocator and caches
    pairs = x.shape[0] * k
    flops = flops_per_pair(model, x) * pairs
    timings = []
    before = matmul_throughput()
    for chunk in chunks:
        torch.manual_seed(0)
        start = time.perf_counter()
        result = importance_estimates(model, x, k, chunk_elements=chunk, progress=False)
        timings.append((chunk or default_chunk_elements(x.device), time.perf_counter() - start, result))
    throughput = max(before, matmul_throughput())
    floor = flops / throughput
    print(
        f"{name}: {x.shape[0]} examples x k={k} = {pairs:.3g} pairs, {flops / 1e9:.0f} GFLOP; matmul "
        f"{before / 1e9:.0f} GFLOP/s before, {throughput / 1e9:.0f} best ({torch.get_num_threads()} "
        f"threads): floor {floor:.2f} s"
    )
    for size, seconds, result in timings:
        print(
            f"  decoder outputs per call 2**{size.bit_length() - 1}: {seconds:.2f} s = "
            f"{seconds / floor:.2f}x floor (IW-NLL {result['iw_nll']:.2f}, NELBO {result['nelbo']:.2f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--chunks", action="store_true", help="compare decoder outputs per call")
    parser.add_argument("--mnist", type=Path, help="the folder holding MNIST/raw: bench MNIST instead")
    parser.add_argument("--examples", type=int, help="only the first N test examples")
    args = parser.parse_args()
    chunks = [2**20, 2**22, 2**24] if args.chunks else [None]
    if args.mnist:
        overrides = ["dataset=mnist", f"dataset.root={args.mnist}", "model.latent_dim=40"]
        bench("MNIST MLP, latent 40 (untrained)", overrides, args.k, chunks, args.examples)
    else:
        bench("digits, default model (untrained)", [], args.k, chunks, args.examples)


if __name__ == "__main__":
    main()
