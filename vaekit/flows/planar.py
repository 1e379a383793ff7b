"""Planar flow steps (Rezende & Mohamed, 2015), amortized: parameters per data point."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Transform, constraints

from vaekit.flows.base import solve_increasing

# Invertibility margin. In floating point softplus and tanh saturate (softplus(-100) + -1 is
# exactly -1), which would let a step's Jacobian factor reach 0; the margin keeps every factor
# >= ~1e-4.
PLANAR_MARGIN = 1e-4
# Shift inside the planar constraint m(a) = -1 + PLANAR_MARGIN + softplus(a + PLANAR_SHIFT),
# chosen so that m(0) = 0: then u = 0 gives u_hat = 0, the identity step.
PLANAR_SHIFT = math.log(math.expm1(1.0 - PLANAR_MARGIN))


class PlanarTransform(Transform):
    """Planar flow step (Rezende & Mohamed, 2015), amortized: y = x + u_hat tanh(w^T x + b).

    u (*B, L), w (*B, L), b (*B,). u_hat = u + (m(w^T u) - w^T u) w / ||w||^2 with
    m(a) = -1 + softplus(a + PLANAR_SHIFT) (+ PLANAR_MARGIN), so w^T u_hat > -1 and the step is
    invertible (their Appendix A). Their m is shifted so that m(0) = 0: u = 0 is the identity
    step (theirs maps u = 0 to u_hat = -0.31 w / ||w||^2, large when w is small).
    log|det| = log|1 + u_hat^T psi|, psi = tanh'(w^T x + b) w, which is
    log(1 + w^T u_hat tanh') > log(PLANAR_MARGIN).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, u: Tensor, w: Tensor, b: Tensor) -> None:
        super().__init__()
        wu = (w * u).sum(-1, keepdim=True)
        w_sq = (w * w).sum(-1, keepdim=True).clamp_min(1e-12)
        m = F.softplus(wu + PLANAR_SHIFT) - 1.0 + PLANAR_MARGIN
        self.u_hat = u + (m - wu) * w / w_sq  # (*B, L)
        self.w = w
        self.b = b
        self.wu_hat = (w * self.u_hat).sum(-1)  # (*B,), > -1

    def _pre(self, x: Tensor) -> Tensor:
        return (x * self.w).sum(-1) + self.b  # (*S, *B)

    def _log_det(self, activation: Tensor) -> Tensor:
        return torch.log1p(self.wu_hat * (1.0 - activation * activation))

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(y, log|det|) for x (*S, *B, L): y (*S, *B, L), log|det| (*S, *B)."""
        activation = torch.tanh(self._pre(x))
        return x + self.u_hat * activation.unsqueeze(-1), self._log_det(activation)

    def _call(self, x: Tensor) -> Tensor:
        return x + self.u_hat * torch.tanh(self._pre(x)).unsqueeze(-1)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self._log_det(torch.tanh(self._pre(x)))

    def _inverse(self, y: Tensor) -> Tensor:
        # w^T y = a + c tanh(a + b) with a = w^T x, c = w^T u_hat > -1: a scalar, increasing
        # equation per point; then x = y - u_hat tanh(a + b).
        c, b = self.wu_hat, self.b
        target = (y * self.w).sum(-1)

        def fn(a: Tensor) -> tuple[Tensor, Tensor]:
            t = torch.tanh(a + b)
            return a + c * t, 1.0 + c * (1.0 - t * t)

        a = solve_increasing(fn, target.detach(), target.detach() - c.abs(), target.detach() + c.abs())
        value, slope = fn(a)  # one Newton step under autograd (see solve_increasing)
        a = a - (value - target) / slope
        return y - self.u_hat * torch.tanh(a + b).unsqueeze(-1)
