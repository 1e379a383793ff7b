"""Parameters and CPU time of one forward + backward pass for net=resnet against net=conv, both at
their config defaults, on CIFAR-shaped input (3, 32, 32), batch 64, in the same process.

    python scripts/bench_nets.py [--rounds 3] [--steps 10] [--threads 1]

The model is the default one-level VAE (latent 16, standard prior, Gaussian posterior) with a
Gaussian likelihood (two outputs per subpixel). The nets run in alternation, round after
round, and each keeps its fastest round, so load that comes and goes on a shared machine hits
both alike. Parameters are the model's (the nets' encoder and decoder hold almost all of them).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from vaekit.likelihoods import GaussianLikelihood
from vaekit.models import VAE
from vaekit.nets import ConvNets
from vaekit.posteriors import GaussianPosterior
from vaekit.priors import StandardPrior
from vaekit.resnet import ResNets

SHAPE = (3, 32, 32)
LATENT_DIM = 16
NETS = {"conv": ConvNets, "resnet": ResNets}  # each at its defaults (configs/net/*.yaml agree)


def build(net: type) -> VAE:
    """The default VAE on CIFAR-shaped images with the net `net()`."""
    make_posterior = partial(GaussianPosterior, latent_dim=LATENT_DIM)
    return VAE(LATENT_DIM, SHAPE, net(), StandardPrior(LATENT_DIM), make_posterior, GaussianLikelihood())


def step_ms(model: VAE, x: torch.Tensor, steps: int) -> float:
    """CPU milliseconds of one forward + backward pass on x, averaged over `steps` after a warm-up."""
    for _ in range(2):
        model(x).loss.mean().backward()
    start = time.process_time()
    for _ in range(steps):
        model(x).loss.mean().backward()
    return (time.process_time() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(64, *SHAPE)
    models = {name: build(net) for name, net in NETS.items()}
    best = dict.fromkeys(NETS, float("inf"))
    for _ in range(args.rounds):
        for name, model in models.items():
            best[name] = min(best[name], step_ms(model, x, args.steps))
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    for name in NETS:
        print(f"net={name:7s} {params[name]:>10,} parameters   {best[name]:7.1f} ms per forward+backward")
    print(
        f"resnet / conv: x{params['resnet'] / params['conv']:.2f} parameters, "
        f"x{best['resnet'] / best['conv']:.2f} time (batch 64, {args.threads} thread(s))"
    )


if __name__ == "__main__":
    main()
