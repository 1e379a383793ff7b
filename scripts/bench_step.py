"""CPU time of one training step for each prior and posterior, as a ratio to the standard
prior with the Gaussian posterior in the same process (MNIST-sized MLP VAE, batch 64).

    python scripts/bench_step.py [--rounds 3] [--steps 60] [--threads 1]

Cases run in alternation, round after round, and each keeps its fastest round, so load that
comes and goes on a shared machine hits every case alike. The ratio of step times is the
ratio of epoch times: an epoch is the same number of steps whatever the prior or posterior.
Spherical posteriors (vmf, power_spherical) run at latent dim 10 against a Gaussian at 10.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from vaekit import posteriors, priors
from vaekit.likelihoods import BernoulliLikelihood
from vaekit.models import VAE
from vaekit.nets import MLPNets

SHAPE = (1, 28, 28)
# name: (latent dim, posterior, prior, posterior settings, the baseline it is compared with)
CASES = {
    "gaussian": (16, posteriors.GaussianPosterior, priors.StandardPrior, {}, "gaussian"),
    "planar": (16, posteriors.PlanarPosterior, priors.StandardPrior, {}, "gaussian"),
    "sylvester orthogonal": (16, posteriors.SylvesterPosterior, priors.StandardPrior, {}, "gaussian"),
    "sylvester householder": (
        16, posteriors.SylvesterPosterior, priors.StandardPrior, {"kind": "householder"}, "gaussian",
    ),
    "sylvester triangular": (
        16, posteriors.SylvesterPosterior, priors.StandardPrior, {"kind": "triangular"}, "gaussian",
    ),
    "iaf": (16, posteriors.IAFPosterior, priors.StandardPrior, {}, "gaussian"),
    "prior mog": (16, posteriors.GaussianPosterior, priors.MixtureOfGaussiansPrior, {}, "gaussian"),
    "prior vampprior": (16, posteriors.GaussianPosterior, "vampprior", {}, "gaussian"),
    "prior flow": (16, posteriors.GaussianPosterior, priors.FlowPrior, {}, "gaussian"),
    "gaussian L10": (10, posteriors.GaussianPosterior, priors.StandardPrior, {}, "gaussian L10"),
    "vmf L10": (10, posteriors.VonMisesFisherPosterior, priors.UniformSpherePrior, {}, "gaussian L10"),
    "power_spherical L10": (
        10, posteriors.PowerSphericalPosterior, priors.UniformSpherePrior, {}, "gaussian L10",
    ),
}


def build(latent: int, posterior: type, prior: type | str, settings: dict) -> VAE:
    """The VAE of one case, with the book's MLP (2 x 256) and a Bernoulli likelihood."""
    p = priors.VampPrior(latent, SHAPE) if prior == "vampprior" else prior(latent)
    make_posterior = partial(posterior, latent_dim=latent, **settings)
    return VAE(latent, SHAPE, MLPNets(256, 2), p, make_posterior, BernoulliLikelihood())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.bernoulli(torch.rand(64, *SHAPE) * 0.3)
    models = {}
    for name, (latent, posterior, prior, settings, _) in CASES.items():
        model = build(latent, posterior, prior, settings)
        models[name] = (model, torch.optim.Adamax(model.parameters(), lr=1e-3))
    best = dict.fromkeys(CASES, float("inf"))
    for _ in range(args.rounds):
        for name, (model, optimizer) in models.items():

            def step(model=model, optimizer=optimizer) -> None:
                model(x).loss.mean().backward()
                optimizer.step()
                optimizer.zero_grad()

            for _ in range(5):  # warm-up
                step()
            start = time.process_time()
            for _ in range(args.steps):
                step()
            best[name] = min(best[name], (time.process_time() - start) / args.steps * 1e3)
    for name, ms in best.items():
        baseline = CASES[name][-1]
        print(f"{name:24s} {ms:6.1f} ms/step   x{ms / best[baseline]:.2f} of {baseline}")


if __name__ == "__main__":
    main()
