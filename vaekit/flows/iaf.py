"""Inverse autoregressive flow (Kingma et al., 2016): MADE networks with a context input, and
the affine autoregressive transform they drive.

pyro's pattern: `ConditionalAffineAutoregressive` (an nn.Module, the flow's own parameters)
turns a context h(x) into an `AffineAutoregressive` transform (a Transform that is also an
nn.Module sharing the same MADE, never a copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaekit.flows.base import TransformModule

# Added to the gate's pre-activation so sigma = sigmoid(s + 4) ~ 0.98 at initialisation and each
# step starts close to the identity (Kingma et al., 2016, Sec. 4, advise a positive bias; pyro uses
# 2, sigma ~ 0.88, so four steps shrink z by 0.6). README's results section compares the two.
GATE_BIAS = 4.0


class MaskedLinear(nn.Linear):
    """y = x (W * mask)^T + bias: a linear layer with a fixed 0/1 connectivity mask (out, in)."""

    def __init__(self, in_features: int, out_features: int, mask: Tensor) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation (Germain et al., 2015) with a context.

    x (*S, *B, L), context (*B, C) -> (m, s), each (*S, *B, L), where output i depends on the
    inputs j with degree(j) < degree(i) only, and on the whole context. Input degrees are
    1..L (reversed when `reverse`); hidden unit k has degree k mod L, and degree-0 units see
    the context alone. The context enters the first hidden layer (Kingma et al., 2016).
    """

    def __init__(
        self, latent_dim: int, context_dim: int, hidden_dim: int, num_layers: int, reverse: bool
    ) -> None:
        super().__init__()
        degrees_in = torch.arange(1, latent_dim + 1)
        if reverse:
            degrees_in = degrees_in.flip(0)
        degrees_hidden = torch.arange(hidden_dim) % latent_dim
        self.register_buffer("degrees", degrees_in, persistent=False)
        self.inputs = MaskedLinear(latent_dim, hidden_dim, degrees_hidden[:, None] >= degrees_in[None, :])
        self.context = nn.Linear(context_dim, hidden_dim, bias=False)
        hidden_mask = degrees_hidden[:, None] >= degrees_hidden[None, :]
        self.hidden = nn.ModuleList(
            MaskedLinear(hidden_dim, hidden_dim, hidden_mask) for _ in range(num_layers - 1)
        )
        out_mask = (degrees_in[:, None] > degrees_hidden[None, :]).repeat(2, 1)
        self.out = MaskedLinear(hidden_dim, 2 * latent_dim, out_mask)
        self.activation = nn.ELU()

    def forward(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """(m, s) for x (*S, *B, L) and context (*B, C)."""
        hidden = self.activation(self.inputs(x) + self.context(context))
        for layer in self.hidden:
            hidden = self.activation(layer(hidden))
        m, s = self.out(hidden).chunk(2, dim=-1)
        return m, s


class AffineAutoregressive(TransformModule):
    """One IAF step (Kingma et al., 2016, Alg. 1, the numerically stable LSTM-type update):

        [m, s] = MADE(x, h),  sigma = sigmoid(s + gate_bias),  y = sigma * x + (1 - sigma) * m

    dy/dx is triangular in the MADE's order with diagonal sigma: log|det| = sum_i log sigma_i.
    x (*S, *B, L), context h (*B, C). The inverse is sequential: L passes of the MADE.
    """

    def __init__(self, made: MADE, context: Tensor, gate_bias: float = GATE_BIAS) -> None:
        super().__init__()
        self.made = made
        self.context = context
        self.gate_bias = gate_bias

    def _gate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m, s = self.made(x, self.context)
        gate = s + self.gate_bias
        return m, torch.sigmoid(gate), F.logsigmoid(gate)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(y, log|det|) for x (*S, *B, L) in one MADE pass."""
        m, sigma, log_sigma = self._gate(x)
        return sigma * x + (1.0 - sigma) * m, log_sigma.sum(-1)

    def _call(self, x: Tensor) -> Tensor:
        m, sigma, _ = self._gate(x)
        return sigma * x + (1.0 - sigma) * m

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self._gate(x)[2].sum(-1)

    def _inverse(self, y: Tensor) -> Tensor:
        # x_i = (y_i - (1 - sigma_i) m_i) / sigma_i, where m_i, sigma_i depend on earlier x only:
        # after pass k the first k coordinates (in the MADE's order) are exact.
        x = torch.zeros_like(y)
        for _ in range(y.shape[-1]):
            m, sigma, _ = self._gate(x)
            x = (y - (1.0 - sigma) * m) / sigma
        return x


class ConditionalAffineAutoregressive(nn.Module):
    """The parameters of one IAF step; `condition(h)` gives the step for context h (*B, C)."""

    def __init__(
        self,
        latent_dim: int,
        context_dim: int,
        hidden_dim: int,
        num_layers: int,
        reverse: bool,
        gate_bias: float = GATE_BIAS,
    ) -> None:
        super().__init__()
        self.made = MADE(latent_dim, context_dim, hidden_dim, num_layers, reverse)
        self.gate_bias = gate_bias

    def condition(self, context: Tensor) -> AffineAutoregressive:
        """The transform x -> y of this step for the given context (shares this MADE)."""
        return AffineAutoregressive(self.made, context, self.gate_bias)
