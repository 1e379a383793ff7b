"""The RNG streams a checkpoint saves, in a form that resumes on any device.

Saved: the global CPU stream, the trainer's CPU data generator (permutations, binarization
noise), the type of the device trained on, and, on a GPU, the global stream of that one
device. On restore the CPU streams always come back exactly; the GPU stream comes back when
the run resumes on a GPU, and otherwise (a run moving between CPU and GPU) the new device's
stream is seeded from the run's seed and position, which is logged.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("vaekit")

DEVICE_TYPES = ("cpu", "cuda", "mps")  # what vaekit trains and evaluates on
CPU_STATE_BYTES = torch.Generator().get_state().numel()  # 5056 for the Mersenne Twister


def derived_seed(*parts: int) -> int:
    """A seed in [0, 2**63) determined by `parts` (e.g. seed, epoch, step), well mixed."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def capture(data_generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """The streams to save: CPU byte tensors, whatever the device."""
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "data": data_generator.get_state(),
        "device_type": device.type,
    }
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore(
    rng: dict[str, Any],
    data_generator: torch.Generator,
    device: torch.device,
    seed: int,
    position: tuple[int, int],
) -> None:
    """Put the saved streams back for a run continuing on `device` at (epoch, step).

    A data state that is not a CPU generator's (a checkpoint of an older vaekit on a GPU) and a
    GPU stream saved on another device type are re-seeded from (seed, epoch, step) instead.
    """
    torch.set_rng_state(rng["torch"].cpu())
    data = rng["data"].cpu()
    if data.numel() == CPU_STATE_BYTES:
        data_generator.set_state(data)
    else:
        data_generator.manual_seed(derived_seed(seed, 1, *position))
        log.info("the checkpoint's data generator state is not a CPU one: re-seeded it from the run's seed")
    if device.type != "cuda":
        return
    saved = _cuda_state(rng.get("cuda"), device)
    if saved is not None:
        torch.cuda.set_rng_state(saved, device)
    else:
        torch.cuda.manual_seed(derived_seed(seed, 2, *position))
        written_on = rng.get("device_type", "cpu")
        log.info("the checkpoint was written on %s: seeded this GPU's stream from the run's seed", written_on)


def _cuda_state(saved: Any, device: torch.device) -> Tensor | None:
    """The saved state of one CUDA device: a tensor, or (older checkpoints) the entry of a list
    with one state per visible GPU, taking the device's own entry or else the first."""
    if isinstance(saved, Tensor):
        return saved.cpu()
    if isinstance(saved, (list, tuple)) and saved:
        index = device.index if device.index is not None else torch.cuda.current_device()
        state = saved[index] if index < len(saved) else saved[0]
        return state.cpu() if isinstance(state, Tensor) else None
    return None


def check_rng(rng: Any) -> str | None:
    """What is wrong with a checkpoint's saved streams, as a clause; None when they can be
    restored."""
    if not isinstance(rng, dict) or not all(_is_byte_tensor(rng.get(key)) for key in ("torch", "data")):
        return "its RNG states are missing or not byte tensors"
    if rng["torch"].numel() != CPU_STATE_BYTES:
        return "its CPU RNG state is not one this torch can restore"
    device_type = rng.get("device_type", "cuda" if "cuda" in rng else "cpu")
    if device_type not in DEVICE_TYPES:
        return f"its RNG states come from a device of type {device_type!r}, which vaekit does not know"
    cuda = rng.get("cuda")
    states = cuda if isinstance(cuda, (list, tuple)) else [cuda] if cuda is not None else []
    if not all(_is_byte_tensor(state) for state in states):
        return "its GPU RNG state is not a byte tensor"
    return None


def _is_byte_tensor(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dtype == torch.uint8 and value.dim() == 1
