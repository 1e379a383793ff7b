"""Random draws that leave the global RNG streams where they were."""

from __future__ import annotations

import contextlib

import torch

from vaekit.errors import VaekitError

MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64-bit seeds; vaekit keeps them non-negative


def own_rng(device: torch.device | None = None) -> contextlib.AbstractContextManager:
    """Restore the global RNG streams of the CPU (and of `device` when it is a GPU) on exit.

    Priors and the flow parts of posteriors are built inside it, so the networks built after
    them start from the same weights, and training sees the same noise, whichever prior or
    posterior is chosen: at one seed, `-m prior=a,b` or `-m posterior=a,b` is a paired
    comparison (common random numbers) rather than a comparison of two initialisations. The
    trainer's validation and image grids run inside it too, so they never shift training's noise.
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def check_seed(seed: int, option: str) -> None:
    """Refuse, in one sentence, a seed torch cannot take (negative or past 64 bits)."""
    if not 0 <= seed <= MAX_SEED:
        raise VaekitError(f"{option} must be between 0 and 2**63 - 1, not {seed}.")
