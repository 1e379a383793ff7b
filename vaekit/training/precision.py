"""`trainer.precision`: "32" (float32), "bf16-mixed" (CUDA GPUs and the CPU) or "16-mixed" (CUDA).

Mixed precision runs the encoder and decoder of each training step under torch.autocast
(`vaekit.net_precision`), and everything that adds up nats (likelihood, log-densities, KL) in
float32; the weights, gradients and optimizer state stay float32. Validation and the test pass
run in float32, so their numbers are exact for the weights trained.

With fp16 the loss is scaled (torch.amp.GradScaler) so that small gradients survive fp16's range.
A step whose scaled gradient overflowed is the scaler's to handle: it is skipped and the scale
halves (the scaler's own check), and it is not counted as non-finite by the trainer's guard,
which looks at the float32 loss only. A non-finite loss is counted as usual, so divergence still
rolls back (the scaler's state rolls back with the optimizer). A step is taken only when both
agree; the decision stays on the device on the guard's sync-free path.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from vaekit.errors import VaekitError
from vaekit.net_precision import lower_precision_nets

DTYPES: dict[str, torch.dtype | None] = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def check_precision(name: str, device: torch.device) -> None:
    """Refuse, in one sentence, a precision vaekit does not offer or `device` cannot run."""
    if name not in DTYPES:
        raise VaekitError(f"trainer.precision must be 32, bf16-mixed or 16-mixed, not {name}.")
    if name == "16-mixed" and device.type != "cuda":
        raise VaekitError(
            f"trainer.precision=16-mixed needs a CUDA GPU (fp16 with a loss scale), not the "
            f"{device.type}: use trainer.precision=bf16-mixed or 32."
        )
    if name == "bf16-mixed" and device.type not in ("cpu", "cuda"):
        raise VaekitError(
            f"trainer.precision=bf16-mixed runs on CUDA GPUs and the CPU, not on {device.type}."
        )
    if name == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise VaekitError(
            "trainer.precision=bf16-mixed needs a GPU with bf16 arithmetic: use trainer.precision=16-mixed."
        )


class Precision:
    """How a training step computes: `nets()` around the forward pass, `backward(loss)`, then
    `unscale(optimizer)` before the gradient is read, `grads_finite(norm)` and `update()`."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device_type = device.type
        self.dtype = DTYPES[name]
        self.scaler = torch.amp.GradScaler(device.type) if name == "16-mixed" else None

    def nets(self) -> contextlib.AbstractContextManager[None]:
        """The context of a training forward pass: the networks in bf16 or fp16 (or float32)."""
        return lower_precision_nets(self.device_type, self.dtype)

    def backward(self, loss: Tensor) -> None:
        """loss.backward(), of the scaled loss with fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale (and record whether they overflowed)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def grads_finite(self, grad_norm: Tensor) -> Tensor | None:
        """With fp16: whether the unscaled gradient is finite (a 0-dim bool tensor on the device;
        the step is skipped otherwise). None without a scaler: the guard checks the gradient."""
        return torch.isfinite(grad_norm) if self.scaler is not None else None

    def update(self) -> None:
        """After each step: the scaler halves its scale after an overflow, else grows it in time."""
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's state (scale, growth tracker) for checkpoints; None without one."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's scaler state (ignored without a scaler, or when absent)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
