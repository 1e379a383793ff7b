"""Host syncs per training step for each posterior and prior, counted on the CPU
(`vaekit.syncs.SyncCounter`): the batch, forward and backward, without the
trainer's own finite-step guard, and without the optimizer step (torch's Adam and Adamax read
their step counters, which stay CPU tensors on a GPU too, so those reads cost no sync).

    python scripts/count_syncs.py                     # the table, digits, default MLP
    python scripts/count_syncs.py --steps 5 --models vae topdown
"""

from __future__ import annotations

import argparse

import torch

from vaekit.build import build
from vaekit.errors import VaekitError
from vaekit.syncs import SyncCounter

POSTERIORS = ("gaussian", "vmf", "power_spherical", "planar", "sylvester", "iaf")
PRIORS = ("standard", "vampprior")
SPHERICAL = ("vmf", "power_spherical")  # these pair with uniform_sphere instead of standard


def compose(*overrides: str):
    """The config `vaekit train OVERRIDES` composes (no run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from vaekit.commands.train import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def syncs_per_step(overrides: list[str], steps: int) -> float | None:
    """Mean host syncs of one training step (after a first warm-up step) for a config; None
    for a combination vaekit refuses."""
    cfg = compose(*overrides)
    torch.manual_seed(0)
    try:
        built = build(cfg, torch.device("cpu"))
    except VaekitError:
        return None
    model, data = built.model, built.data
    if hasattr(model.prior, "initialize_from_data"):
        model.prior.initialize_from_data(data.train)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    perm = data.permutation(generator)
    counts = []
    for step in range(steps + 1):
        with SyncCounter() as counter:
            x = data.train_batch(perm, step, 64, generator)
            loss = model(x, beta=1.0, free_bits=0.0).loss.mean()
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()  # outside: torch's Adam reads its step counters, CPU tensors on any device
        if step > 0:
            counts.append(counter.total)
    return sum(counts) / len(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["vae"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for model in args.models:
        print(f"host syncs per training step, model={model}")
        print(f"model={model}; with {', '.join(SPHERICAL)} the standard column is prior=uniform_sphere")
        print("| posterior | " + " | ".join(PRIORS) + " |")
        print("|---|" + "---|" * len(PRIORS))
        for posterior in POSTERIORS:
            priors = [("uniform_sphere" if p == "standard" and posterior in SPHERICAL else p) for p in PRIORS]
            row = [
                syncs_per_step([f"model={model}", f"posterior={posterior}", f"prior={prior}"], args.steps)
                for prior in priors
            ]
            print(f"| {posterior} | " + " | ".join("n/a" if n is None else f"{n:g}" for n in row) + " |")


if __name__ == "__main__":
    main()
