"""What every flow shares: the one `TransformModule`, the fused forward pass, the scalar solver
that inverts planar and Sylvester steps, and `FlowDistribution`, which chains transforms after a
base distribution.

Every transform is a `torch.distributions.Transform` on vectors (event_dim 1) whose
`log_abs_det_jacobian(x, y)` is computed from its arguments. Amortized transforms hold one
set of parameters per data point, shape (*B, ...), and act on x (*S, *B, L) for any sample
shape *S by broadcasting. `forward_and_log_det(x)` gives y and log|det dy/dx| in one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Transform, constraints

from vaekit.syncs import checks_are_free

# At most this many safeguarded Newton steps in the scalar solves that invert planar and
# Sylvester steps. On the CPU the solve stops once no point moves by more than a few ulps
# (checked every SOLVER_CHECK_EVERY steps, at most SOLVER_MAX_STEPS); on accelerators it runs
# SOLVER_STEPS without asking, since each check stalls the device. Newton settles most points
# in 3-5 steps; where it would leave the bracket, bisection takes over, and the slowest points
# seen in training settle by step 18.
SOLVER_STEPS = 30
SOLVER_MAX_STEPS = 60
SOLVER_CHECK_EVERY = 6
# (sample, log q(sample), base sample) triples a FlowDistribution remembers, newest first.
MAX_RECORDS = 4


class TransformModule(Transform, nn.Module):
    """A bijective Transform on vectors (event_dim 1) that is also an nn.Module (pyro's
    TransformModule pattern): its parameters are trained, moved and saved like any module's,
    and it plugs into `TransformedDistribution`. Nothing is cached between calls."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    # Transform defines __eq__ as identity, which drops the hash nn.Module needs
    # (named_modules keeps a set of modules).
    __hash__ = nn.Module.__hash__

    def __init__(self) -> None:
        super().__init__(cache_size=0)  # Transform.__init__ chains on to nn.Module.__init__


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
    check = checks_are_free(target)
    eps = torch.finfo(target.dtype).eps
    with torch.no_grad():
        a = 0.5 * (lo + hi)
        for step in range(1, (SOLVER_MAX_STEPS if check else SOLVER_STEPS) + 1):
            value, slope = fn(a)
            gap = value - target
            lo = torch.where(gap < 0, a, lo)
            hi = torch.where(gap > 0, a, hi)
            newton = a - gap / slope
            a_next = torch.where((newton >= lo) & (newton <= hi), newton, 0.5 * (lo + hi))
            if check and step % SOLVER_CHECK_EVERY == 0:
                if bool(((a_next - a).abs() <= 4 * eps * (1.0 + a.abs())).all()):
                    return a_next
            a = a_next
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
