"""Sylvester flow steps (van den Berg et al., 2018), amortized, and the orthogonal matrices
they need (orthonormal columns, Householder products, permutations)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Transform, constraints

from vaekit.flows.base import rows, solve_increasing
from vaekit.syncs import checks_are_free

# Bound on |r_ii| and |r~_ii|. tanh saturates in float32 (tanh(10) is exactly 1), which would let
# a step's Jacobian factor reach 0; the bound keeps every factor >= ~2e-3.
SYLVESTER_DIAGONAL_BOUND = 1.0 - 1e-3
# Steps of `orthogonalize`. On the CPU: FAST_STEPS quintic Newton-Schulz steps, then Bjorck
# steps until max |I - Q^T Q| < ORTHOGONAL_TOL. On accelerators, fixed counts that need no
# check: SYNC_FREE_FAST_STEPS then SYNC_FREE_BJORCK_STEPS bring that error to float32 rounding
# (~2e-7) even for a raw matrix whose smallest singular value is 1e-5 of its Frobenius norm
# (tests/test_flows.py checks that case).
FAST_STEPS = 8
ORTHOGONAL_TOL = 1e-4
MAX_BJORCK_STEPS = 100
SYNC_FREE_FAST_STEPS = 12
SYNC_FREE_BJORCK_STEPS = 12


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


def orthogonalize(raw: Tensor) -> Tensor:
    """Q (..., L, M) with Q^T Q = I_M from raw (..., L, M), M <= L: the orthogonal polar factor
    of raw by the iteration of Bjorck & Bowie (1971) that van den Berg et al. (2018) use,

        Q_0 = raw / ||raw||_F,   Q_{k+1} = Q_k (I + (I - Q_k^T Q_k) / 2),

    which converges when ||Q_0||_2 < sqrt(3) (the Frobenius scaling ensures it), but grows a
    small singular value only 1.5 times per step. So the first steps are the quintic
    Newton-Schulz steps of Jordan et al. (2024, "Muon"), Q <- a Q + Q (b G + c G^2), G = Q^T Q,
    which grow small singular values ~3.4 times per step and keep all of them in (0, 1.2);
    Bjorck steps then converge to the same polar factor (step counts: see FAST_STEPS).
    Differentiable throughout.
    """
    check = checks_are_free(raw)
    q = raw / torch.linalg.matrix_norm(raw).clamp_min(1e-12)[..., None, None]
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(FAST_STEPS if check else SYNC_FREE_FAST_STEPS):
        gram = q.mT @ q
        q = a * q + q @ (b * gram + c * gram @ gram)
    eye = torch.eye(raw.shape[-1], dtype=raw.dtype, device=raw.device)
    for _ in range(MAX_BJORCK_STEPS if check else SYNC_FREE_BJORCK_STEPS):
        residual = eye - q.mT @ q
        converged = check and bool(residual.abs().amax() < ORTHOGONAL_TOL)  # free on the CPU
        q = q + 0.5 * q @ residual
        if converged:
            break
    return q


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
