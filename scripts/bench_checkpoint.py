"""Cost of the checkpoint digest: save_atomic and load_checkpoint (with the digest) against
plain torch.save / torch.load of the same checkpoint, on the MNIST MLP (no data needed).

    python scripts/bench_checkpoint.py --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from vaekit.likelihoods import BernoulliLikelihood
from vaekit.models import VAE
from vaekit.nets import MLPNets
from vaekit.posteriors import GaussianPosterior
from vaekit.priors import StandardPrior
from vaekit.training.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_atomic


def mnist_mlp_checkpoint(latent_dim: int) -> dict:
    """Model and Adamax state of the default MLP VAE on 28x28 images, as Trainer writes them."""
    torch.manual_seed(0)
    model = VAE(
        latent_dim,
        (1, 28, 28),
        MLPNets(),
        StandardPrior(latent_dim),
        partial(GaussianPosterior, latent_dim=latent_dim),
        BernoulliLikelihood(),
    )
    optimizer = torch.optim.Adamax(model.parameters())
    model(torch.rand(8, 1, 28, 28).bernoulli()).loss.mean().backward()
    optimizer.step()
    return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


def seconds(action, rounds: int) -> float:
    """Median wall time of `action()` over `rounds` calls."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--latent-dim", type=int, default=40)
    args = parser.parse_args()
    checkpoint = mnist_mlp_checkpoint(args.latent_dim)
    with tempfile.TemporaryDirectory() as tmp:
        plain, ours = Path(tmp) / "plain.pt", Path(tmp) / "ours.pt"
        save_plain = seconds(lambda: torch.save(checkpoint, plain), args.rounds)
        save_ours = seconds(lambda: save_atomic(checkpoint, ours), args.rounds)
        load_plain = seconds(lambda: torch.load(plain, weights_only=True), args.rounds)
        load_ours = seconds(lambda: load_checkpoint(ours), args.rounds)
        size = ours.stat().st_size / 2**20
    print(
        f"MNIST MLP checkpoint ({size:.1f} MiB): write {save_ours * 1e3:.1f} ms vs torch.save "
        f"{save_plain * 1e3:.1f} ms (ratio {save_ours / save_plain:.2f}); load {load_ours * 1e3:.1f} ms "
        f"vs torch.load {load_plain * 1e3:.1f} ms (ratio {load_ours / load_plain:.2f})"
    )


if __name__ == "__main__":
    main()
