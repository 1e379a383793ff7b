"""One flat buffer for all of a model's parameters and one for their gradients.

Every parameter becomes a view into `FlatParameters.param` (and its .grad a view into
`param.grad`), so the optimizer updates a single tensor: a handful of kernels per step
instead of a handful per parameter. The arithmetic is unchanged element by element.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FlatParameters:
    """Re-home the trainable parameters of `model` into one contiguous buffer.

    `param` is the flat nn.Parameter (P,) to hand to the optimizer; gradients accumulate
    into `param.grad` through the per-parameter views. Call `zero_grad()` instead of the
    optimizer's (which would drop the shared gradient buffer).
    """

    def __init__(self, model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params or len({(p.dtype, p.device) for p in params}) != 1:
            raise ValueError("FlatParameters needs parameters of a single dtype and device.")
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.param = nn.Parameter(flat)
        self.param.grad = torch.zeros_like(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.data = self.param.data[offset : offset + n].view_as(p)
            p.grad = self.param.grad[offset : offset + n].view_as(p)
            offset += n
        self.views = params

    def zero_grad(self) -> None:
        """Zero every gradient in place (one kernel); the views stay attached."""
        self.param.grad.zero_()

    def grad_norm(self) -> Tensor:
        """Global L2 norm of all gradients, a 0-d tensor on the device."""
        return torch.linalg.vector_norm(self.param.grad)
