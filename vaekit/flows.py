"""Normalizing flows for q(z|x): amortized planar and Sylvester transforms, and the flow
distribution that chains them after a base Gaussian. (IAF, with its MADE networks, is in
vaekit/autoregressive.py.)

Every transform is a `torch.distributions.Transform` on vectors (event_dim 1) whose
`log_abs_det_jacobian(x, y)` is computed from its arguments. Amortized transforms hold one
set of parameters per data point, shape (*B, ...), and act on x (*S, *B, L) for any sample
shape *S by broadcasting. `forward_and_log_det(x)` gives y and log|det dy/dx| in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, Transform, constraints

# At most this many safeguarded Newton steps in the scalar solves that invert planar and
# Sylvester steps (Newton converges in a handful; bisection takes over where Newton would leave
# the bracket); the solve stops early once no point moves by more than a few ulps.
SOLVER_STEPS = 60
SOLVER_CHECK_EVERY = 6
# (sample, log q(sample), base sample) triples a FlowDistribution remembers, newest first.
MAX_RECORDS = 4
# Invertibility margins. In floating point softplus and tanh saturate (softplus(-100) + -1 is
# exactly -1, tanh(10) is exactly 1 in float32), which would let a step's Jacobian factor reach
# 0; the margins keep every factor >= ~1e-4 (planar) or ~2e-3 (Sylvester).
PLANAR_MARGIN = 1e-4
# Shift inside the planar constraint m(a) = -1 + PLANAR_MARGIN + softplus(a + PLANAR_SHIFT),
# chosen so that m(0) = 0: then u = 0 gives u_hat = 0, the identity step.
PLANAR_SHIFT = math.log(math.expm1(1.0 - PLANAR_MARGIN))
SYLVESTER_DIAGONAL_BOUND = 1.0 - 1e-3


def forward_and_log_det(transform: Transform, x: Tensor) -> tuple[Tensor, Tensor]:
    """(y, log|det dy/dx|) of one transform: the fused pass where it has one."""
    fused = getattr(transform, "forward_and_log_det", None)
    if fused is not None:
        return fused(x)
    y = transform(x)
    return y, transform.log_abs_det_jacobian(x, y)


def solve_increasing(
    fn: Callable[[Tensor], tuple[Tensor, Tensor]], target: Tensor, lo: Tensor, hi: Tensor
) -> Tensor:
    """a with fn(a) = target, elementwise, for fn increasing on the bracket [lo, hi].

    fn returns (value, derivative). Safeguarded Newton: a Newton step where it stays in the
    bracket, else bisection. No gradient: callers finish with one Newton step under autograd,
    which carries the implicit-function gradient da/dtheta = -(df/dtheta) / (df/da).
    """
    eps = torch.finfo(target.dtype).eps
    with torch.no_grad():
        a = 0.5 * (lo + hi)
        for step in range(1, SOLVER_STEPS + 1):
            value, slope = fn(a)
            gap = value - target
            lo = torch.where(gap < 0, a, lo)
            hi = torch.where(gap > 0, a, hi)
            newton = a - gap / slope
            a_next = torch.where((newton >= lo) & (newton <= hi), newton, 0.5 * (lo + hi))
            settled = (a_next - a).abs() <= 4 * eps * (1.0 + a.abs())
            a = a_next
            if step % SOLVER_CHECK_EVERY == 0 and bool(settled.all()):  # one host sync
                break
    return a


def rows(x: Tensor, matrix: Tensor) -> Tensor:
    """x^T M for row vectors x (..., n) and matrices M (n, p) or (*B, n, p) -> (..., p), broadcast.

    Per-example matrices are tiny (n, p <= L): the contraction is picked by shape because a
    batched matmul of tiny matrices is slow on CPU; all three forms compute the same numbers.
    """
    if matrix.dim() == 2:
        return x @ matrix
    if x.dim() == matrix.dim() - 1:  # no sample dimensions: broadcast multiply and sum
        return (x.unsqueeze(-1) * matrix).sum(-2)
    if matrix.dim() == 3 and x.shape[-2] == matrix.shape[0]:  # (*S, B, n) x (B, n, p)
        return torch.einsum("...bn,bnp->...bp", x, matrix)
    return (x.unsqueeze(-2) @ matrix).squeeze(-2)


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


class SylvesterTransform(Transform):
    """Sylvester flow step (van den Berg et al., 2018), amortized:

        y = x + Q R tanh(R~ Q^T x + b),   log|det| = sum_i log|1 + r~_ii r_ii tanh'(.)_i|

    Q (*B, L, M) or (L, M) with orthonormal columns (M <= L); R, R~ (*B, M, M) upper
    triangular with |r_ii|, |r~_ii| < 1, so every factor is positive (their Theorem 2 with
    h = tanh, h' in (0, 1]); b (*B, M). By Sylvester's determinant identity the Jacobian
    det(I_L + Q R diag(h') R~ Q^T) = det(I_M + diag(h') R~ R) = prod_i (1 + h'_i r~_ii r_ii).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, q: Tensor, r: Tensor, r_tilde: Tensor, b: Tensor) -> None:
        super().__init__()
        self.q = q
        self.r = r
        self.r_tilde = r_tilde
        self.b = b
        self.diag = torch.diagonal(r, dim1=-2, dim2=-1) * torch.diagonal(r_tilde, dim1=-2, dim2=-1)

    def _activation(self, x: Tensor) -> Tensor:
        return torch.tanh(rows(rows(x, self.q), self.r_tilde.mT) + self.b)  # (*S, *B, M)

    def _shift(self, activation: Tensor) -> Tensor:
        return rows(rows(activation, self.r.mT), self.q.mT)  # Q R h, (*S, *B, L)

    def _log_det(self, activation: Tensor) -> Tensor:
        return torch.log1p(self.diag * (1.0 - activation * activation)).sum(-1)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(y, log|det|) for x (*S, *B, L): y (*S, *B, L), log|det| (*S, *B)."""
        activation = self._activation(x)
        return x + self._shift(activation), self._log_det(activation)

    def _call(self, x: Tensor) -> Tensor:
        return x + self._shift(self._activation(x))

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self._log_det(self._activation(x))

    def _inverse(self, y: Tensor) -> Tensor:
        # With v = Q^T x: Q^T y = v + R tanh(R~ v + b), an upper triangular system in v solved
        # from the last coordinate up (one increasing scalar equation each); x differs from y
        # only inside the span of Q: x = y - Q R tanh(R~ v + b).
        r, r_tilde, b = self.r, self.r_tilde, self.b
        target = rows(y, self.q)  # (*S, *B, M)
        size = target.shape[-1]
        with torch.no_grad():
            v = torch.zeros_like(target)
            h = torch.zeros_like(target)
            for i in range(size - 1, -1, -1):
                inner = (r_tilde[..., i, i + 1 :] * v[..., i + 1 :]).sum(-1) + b[..., i]
                rest = target[..., i] - (r[..., i, i + 1 :] * h[..., i + 1 :]).sum(-1)
                r_ii, rt_ii = r[..., i, i], r_tilde[..., i, i]

                def fn(
                    a: Tensor, r_ii: Tensor = r_ii, rt_ii: Tensor = rt_ii, inner: Tensor = inner
                ) -> tuple[Tensor, Tensor]:
                    t = torch.tanh(rt_ii * a + inner)
                    return a + r_ii * t, 1.0 + r_ii * rt_ii * (1.0 - t * t)

                v[..., i] = solve_increasing(fn, rest, rest - r_ii.abs(), rest + r_ii.abs())
                h[..., i] = torch.tanh(rt_ii * v[..., i] + inner)
        # one Newton step under autograd: v <- v - J^{-1} g(v), J = I + R diag(h') R~ (upper)
        activation = torch.tanh(rows(v, r_tilde.mT) + b)
        gap = v + rows(activation, r.mT) - target
        jacobian = torch.eye(size, dtype=y.dtype, device=y.device) + r @ (
            (1.0 - activation * activation).unsqueeze(-1) * r_tilde
        )
        v = v - torch.linalg.solve_triangular(jacobian, gap.unsqueeze(-1), upper=True).squeeze(-1)
        return y - self._shift(torch.tanh(rows(v, r_tilde.mT) + b))


def sylvester_triangular(off_diagonal: Tensor, diag_r: Tensor, diag_r_tilde: Tensor) -> tuple[Tensor, Tensor]:
    """R, R~ (..., M, M) upper triangular from one (..., M, M) and two (..., M) raw outputs
    (van den Berg et al.'s amortization): R takes the strict upper triangle of `off_diagonal`, R~
    the strict lower one transposed; diagonals bound * tanh(.) in (-1, 1), so
    1 + r~_ii r_ii h' >= 1 - bound^2 > 0 for h = tanh: every step is invertible."""
    bound = SYLVESTER_DIAGONAL_BOUND
    r = torch.triu(off_diagonal, diagonal=1) + torch.diag_embed(bound * torch.tanh(diag_r))
    r_tilde = torch.triu(off_diagonal.mT, diagonal=1) + torch.diag_embed(bound * torch.tanh(diag_r_tilde))
    return r, r_tilde


def orthogonalize(raw: Tensor, tol: float = 1e-4, max_steps: int = 100) -> Tensor:
    """Q (..., L, M) with Q^T Q = I_M from raw (..., L, M), M <= L: the orthogonal polar factor
    of raw by the iteration of Bjorck & Bowie (1971) that van den Berg et al. (2018) use,

        Q_0 = raw / ||raw||_F,   Q_{k+1} = Q_k (I + (I - Q_k^T Q_k) / 2),

    which converges when ||Q_0||_2 < sqrt(3) (the Frobenius scaling ensures it), but grows a
    small singular value only 1.5 times per step. So the first FAST_STEPS steps are the quintic
    Newton-Schulz steps of Jordan et al. (2024, "Muon"), Q <- a Q + Q (b G + c G^2), G = Q^T Q,
    which grow small singular values ~3.4 times per step and keep all of them in (0, 1.2);
    Bjorck steps then converge to the same polar factor, until max |I - Q^T Q| < tol before a
    step (the error after it is ~tol^2, i.e. rounding). Differentiable throughout.
    """
    q = raw / torch.linalg.matrix_norm(raw).clamp_min(1e-12)[..., None, None]
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(FAST_STEPS):
        gram = q.mT @ q
        q = a * q + q @ (b * gram + c * gram @ gram)
    eye = torch.eye(raw.shape[-1], dtype=raw.dtype, device=raw.device)
    for _ in range(max_steps):
        residual = eye - q.mT @ q
        converged = bool(residual.abs().amax() < tol)  # one host sync per step
        q = q + 0.5 * q @ residual
        if converged:
            break
    return q


FAST_STEPS = 8


def householder_product(vectors: Tensor) -> Tensor:
    """Q = H_1 H_2 ... H_K (..., L, L), H_k = I - 2 v_k v_k^T / ||v_k||^2, from vectors (..., K, L):
    an orthogonal matrix (Tomczak & Welling, 2016; van den Berg et al., 2018)."""
    size = vectors.shape[-1]
    q = torch.eye(size, dtype=vectors.dtype, device=vectors.device).expand(*vectors.shape[:-2], size, size)
    unit = vectors / torch.linalg.vector_norm(vectors, dim=-1, keepdim=True).clamp_min(1e-12)
    for k in range(vectors.shape[-2]):
        v = unit[..., k, :]
        q = q - 2.0 * (q * v.unsqueeze(-2)).sum(-1, keepdim=True) * v.unsqueeze(-2)  # Q <- Q H_k
    return q


def permutation_matrix(size: int, reverse: bool, like: Tensor) -> Tensor:
    """Identity (reverse=False) or reversal permutation (L, L): Q of triangular Sylvester flows."""
    eye = torch.eye(size, dtype=like.dtype, device=like.device)
    return eye.flip(-1) if reverse else eye


class FlowDistribution(Distribution):
    """q_K(z): z_K = f_K o ... o f_1(z_0), z_0 ~ base (batch (*B,), event (L,)), with

        log q_K(z_K) = log q_0(z_0) - sum_k log|det d f_k / d z_{k-1}|   (Rezende & Mohamed, 2015)

    rsample(sample_shape) -> (*S, *B, L) records log q of the samples it returns, so log_prob of
    those very tensors is exact and costs nothing (and `base_sample` gives the z_0 under them);
    any other z is mapped back through the transforms' inverses (exact up to solver tolerance;
    slow for autoregressive flows).
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, base: Distribution, transforms: Sequence[Transform]) -> None:
        self.base = base
        self.transforms = list(transforms)
        self._records: list[tuple[Tensor, Tensor, Tensor]] = []
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Reparameterised z_K (*sample_shape, *B, L)."""
        z0 = self.base.rsample(sample_shape)
        z, log_q = z0, self.base.log_prob(z0)
        for transform in self.transforms:
            z, log_det = forward_and_log_det(transform, z)
            log_q = log_q - log_det
        self._records = [(z, log_q, z0), *self._records[: MAX_RECORDS - 1]]
        return z

    def base_sample(self, value: Tensor) -> Tensor | None:
        """The base draw z_0 (*S, *B, L) under a sample z_K that rsample returned; None for any
        other tensor."""
        return next((z0 for sample, _, z0 in self._records if value is sample), None)

    def log_prob(self, value: Tensor) -> Tensor:
        """log q_K(z) for z (*S, *B, L) -> (*S, *B)."""
        for sample, log_q, _ in self._records:
            if value is sample:
                return log_q
        log_det = torch.zeros((), dtype=value.dtype, device=value.device)
        y = value
        for transform in reversed(self.transforms):
            x = transform.inv(y)
            log_det = log_det + transform.log_abs_det_jacobian(x, y)
            y = x
        return self.base.log_prob(y) - log_det
