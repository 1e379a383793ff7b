"""The precision the encoder and decoder networks run in (`trainer.precision`).

Inside `lower_precision_nets(device_type, dtype)` (the trainer enters it around each training
step's forward pass) `run_net` runs a network under `torch.autocast` and casts its output back
to float32. Only the encoder and decoder, where nearly all of the arithmetic is, run in bf16 or
fp16: the posterior heads, priors, flows, the likelihood's log-density and every KL term see
float32 inputs and compute in float32, so the reported nats are float32 sums. Outside the
context (validation, test, sampling) `run_net` is a plain call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor, nn

# (device type, dtype) while the networks run in lower precision; None: float32
_NETS: ContextVar[tuple[str, torch.dtype] | None] = ContextVar("vaekit_net_precision", default=None)


@contextlib.contextmanager
def lower_precision_nets(device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """Within it, `run_net` autocasts to `dtype` on `device_type` (None: float32, no autocast)."""
    if dtype is None:
        yield
        return
    token = _NETS.set((device_type, dtype))
    try:
        yield
    finally:
        _NETS.reset(token)


def run_net(net: nn.Module, x: Tensor) -> Tensor:
    """net(x); inside `lower_precision_nets`, computed under autocast and returned as float32."""
    mode = _NETS.get()
    if mode is None:
        return net(x)
    with torch.autocast(mode[0], dtype=mode[1]):
        out = net(x)
    return out.float()
