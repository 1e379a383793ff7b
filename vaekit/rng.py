"""Random draws that leave the global RNG streams where they were."""

from __future__ import annotations

import contextlib

import torch


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
