"""RealNVP affine coupling layers (Dinh et al., 2017) as invertible transforms.

Each layer is a `torch.distributions.Transform` that is also an `nn.Module` (pyro's
TransformModule pattern), so it plugs into `TransformedDistribution` and its parameters
are trained, moved and saved like any module's. Nothing is cached between calls: the
inverse and the log-determinant are computed from their arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vaekit.errors import VaekitError
from vaekit.flows.base import TransformModule
from vaekit.nets import mlp


class AffineCoupling(TransformModule):
    """One RealNVP affine coupling layer on R^D (Dinh et al., 2017, eq. 4-9).

    With a binary mask m (1 = passed through and conditioned on):

        y = m * x + (1 - m) * (x * exp(s(m * x)) + t(m * x))
        x = m * y + (1 - m) * ((y - t(m * y)) * exp(-s(m * y)))
        log|det dy/dx| = sum_d (1 - m_d) s_d(m * x)

    s = scale * tanh(.) keeps the log-scale bounded (learned per-dimension `scale`), so the
    map can never blow up in one step. The mask keeps dimensions d with d % 2 == parity;
    stack layers of both parities so every dimension is transformed. The last layer of the
    conditioner starts at zero: a fresh coupling is the identity.

    Shapes: x, y (*batch, D); log-determinant (*batch,).
    """

    def __init__(self, dim: int, hidden_dim: int, parity: int, num_layers: int = 2) -> None:
        super().__init__()
        if dim < 1 or hidden_dim < 1 or num_layers < 1:
            raise VaekitError(
                f"a coupling layer needs dim, hidden_dim and num_layers of at least 1, "
                f"not {dim}, {hidden_dim} and {num_layers}."
            )
        self.dim = dim
        self.register_buffer("mask", (torch.arange(dim) % 2 == parity % 2).float())  # (D,)
        self.conditioner = mlp([dim] + [hidden_dim] * num_layers + [2 * dim], final_activation=False)
        last = self.conditioner[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.scale = nn.Parameter(torch.ones(dim))  # bound of |s| per dimension

    def scale_shift(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Log-scale s and shift t (*batch, D) from the kept part m * x; zero where m = 1."""
        free = 1.0 - self.mask
        raw_s, t = self.conditioner(x * self.mask).chunk(2, dim=-1)
        return free * self.scale * torch.tanh(raw_s), free * t

    def _call(self, x: Tensor) -> Tensor:
        s, t = self.scale_shift(x)
        return x * torch.exp(s) + t  # s = t = 0 on kept dimensions: y = x there

    def _inverse(self, y: Tensor) -> Tensor:
        s, t = self.scale_shift(y)  # m * y = m * x, so s and t are those of the forward map
        return (y - t) * torch.exp(-s)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """log|det dy/dx| = sum of the log-scales, shape (*batch,); the Jacobian is triangular."""
        s, _ = self.scale_shift(x)
        return s.sum(-1)


def real_nvp(dim: int, num_flows: int, hidden_dim: int) -> nn.ModuleList:
    """`num_flows` affine couplings with alternating masks (even, odd, even, ...) on R^dim."""
    if num_flows < 1:
        raise VaekitError(f"prior.num_flows must be at least 1, not {num_flows}.")
    if hidden_dim < 1:
        raise VaekitError(f"prior.hidden_dim must be at least 1, not {hidden_dim}.")
    return nn.ModuleList(AffineCoupling(dim, hidden_dim, parity=i % 2) for i in range(num_flows))
