"""Distributions torch lacks: von Mises-Fisher, power spherical and the uniform on the sphere,
with their KL to the uniform registered by `register_kl` (so `vaekit.kl.kl_term` finds it)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints, register_kl

from vaekit.bessel import log_bessel_iv_and_ratio
from vaekit.syncs import checks_are_free

# --------------------------------------------------------------------------------------------
# Distributions on the unit sphere S^{m-1} = {z in R^m : ||z|| = 1}
# --------------------------------------------------------------------------------------------


class _Sphere(constraints.Constraint):
    """Unit vectors along the last dimension (float32 tolerance)."""

    event_dim = 1

    def check(self, value: Tensor) -> Tensor:
        return (torch.linalg.vector_norm(value, dim=-1) - 1.0).abs() < 1e-4


sphere = _Sphere()


def log_sphere_area(dim: int) -> float:
    """log |S^{dim-1}| = log(2 pi^{dim/2} / Gamma(dim/2)), the surface area of the unit sphere in R^dim."""
    return math.log(2.0) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)


def _check_sphere_params(loc: Tensor, concentration: Tensor) -> None:
    if loc.dim() < 1 or loc.shape[-1] < 2:
        raise ValueError(f"loc needs a last dimension m >= 2 (S^(m-1)), not shape {tuple(loc.shape)}")
    if concentration.shape != loc.shape[:-1]:
        raise ValueError(
            f"concentration needs shape {tuple(loc.shape[:-1])}, not {tuple(concentration.shape)}"
        )


def _around(loc: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Unit vectors z with loc^T z = cos, uniform over the remaining directions.

    cos, sin: (*S, *B) with cos^2 + sin^2 = 1; loc: (*B, m) unit -> z (*S, *B, m). The point
    (cos, sin v), v uniform on S^{m-2}, is drawn around a pole p = -sign(loc_1) e_1 and carried
    to loc by the Householder reflection H = I - 2 u u^T / ||u||^2, u = p - loc (Davidson et
    al., 2018, Alg. 1 with the pole whose sign keeps ||u||^2 = 2 + 2 |loc_1| >= 2: no 0/0 when
    loc is near e_1). H is orthogonal with H p = loc, so the law is the same.
    """
    m = loc.shape[-1]
    v = torch.randn(*cos.shape, m - 1, dtype=loc.dtype, device=loc.device)
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-30)
    sign = torch.where(loc[..., :1] >= 0, -1.0, 1.0).to(loc.dtype)  # (*B, 1)
    x = torch.cat([sign * cos.unsqueeze(-1), sin.unsqueeze(-1) * v], dim=-1)  # around the pole
    u = torch.cat([sign - loc[..., :1], -loc[..., 1:]], dim=-1)  # (*B, m)
    u_sq = (u * u).sum(-1, keepdim=True)
    return x - (2.0 * (u * x).sum(-1, keepdim=True) / u_sq) * u


class _DirectionalDistribution(Distribution):
    """Shared set-up of the distributions on S^{m-1} given a unit mean direction `loc` (*B, m)
    and a concentration (*B,): batch (*B,), event (m,)."""

    def __init__(self, loc: Tensor, concentration: Tensor, validate_args: bool | None = None) -> None:
        _check_sphere_params(loc, concentration)
        self.loc = loc
        self.concentration = concentration
        self.dim = loc.shape[-1]
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=validate_args)

    @property
    def mode(self) -> Tensor:
        """The mean direction mu: (*B, m)."""
        return self.loc


class VonMisesFisher(_DirectionalDistribution):
    """von Mises-Fisher distribution on S^{m-1} (Davidson et al., 2018, "Hyperspherical VAEs").

    q(z | mu, kappa) = C_m(kappa) exp(kappa mu^T z),
    C_m(kappa) = kappa^{m/2-1} / ((2 pi)^{m/2} I_{m/2-1}(kappa)).
    loc mu (*B, m) unit vectors, concentration kappa (*B,) > 0; batch (*B,), event (m,).

    rsample: Wood's (1994) rejection sampler for w = mu^T z, vectorised on the device, with the
    reparameterisation of Davidson et al.: the accepted Beta((m-1)/2, (m-1)/2) draw eps is held
    fixed and w = (1 - (1 + b) eps) / (1 - (1 - b) eps) is differentiated through
    b(kappa) = (m - 1) / (2 kappa + sqrt(4 kappa^2 + (m - 1)^2)): the g_rep term. Like the
    authors' code we drop their correction term g_cor (a score-function term that needs the
    loss), so d E[mu^T z] / d kappa is biased low, most at small m (README's results section
    gives the size). log C_m uses `vaekit.bessel.log_bessel_iv_and_ratio`.
    """

    arg_constraints = {"loc": constraints.real_vector, "concentration": constraints.positive}
    support = sphere
    has_rsample = True

    def _log_normalizer_and_mean_cosine64(self) -> tuple[Tensor, Tensor]:
        """(log C_m(kappa), A_m(kappa) = I_{m/2}(kappa) / I_{m/2-1}(kappa) = E[mu^T z]), float64 (*B,)."""
        kappa = self.concentration.double()
        order = 0.5 * self.dim - 1.0
        log_iv, ratio = log_bessel_iv_and_ratio(order, kappa)
        log_c = order * torch.log(kappa) - 0.5 * self.dim * math.log(2 * math.pi) - log_iv
        return log_c, ratio

    @property
    def mean(self) -> Tensor:
        """E[z] = A_m(kappa) mu, inside the ball: (*B, m)."""
        mean_cosine = self._log_normalizer_and_mean_cosine64()[1]
        return mean_cosine.to(self.loc.dtype).unsqueeze(-1) * self.loc

    def log_prob(self, value: Tensor) -> Tensor:
        """log C_m(kappa) + kappa mu^T z for z (*S, *B, m) -> (*S, *B)."""
        if self._validate_args:
            self._validate_sample(value)
        kappa = self.concentration
        # kappa (mu^T z - 1) + (log C + kappa): no large terms cancel in float32 when kappa is big
        shifted = (self._log_normalizer_and_mean_cosine64()[0] + kappa.double()).to(kappa.dtype)
        return kappa * ((self.loc * value).sum(-1) - 1.0) + shifted

    def entropy(self) -> Tensor:
        """H = -log C_m(kappa) - kappa A_m(kappa), shape (*B,)."""
        log_c, mean_cosine = self._log_normalizer_and_mean_cosine64()
        return (-log_c - self.concentration.double() * mean_cosine).to(self.loc.dtype)

    def _accepted_eps(self, kappa: Tensor) -> Tensor:
        """Wood's rejection step: the accepted Beta draws eps, shape of kappa, no gradient.

        On the CPU, where a check costs nothing, one round is drawn at a time until every draw
        is accepted. On an accelerator, where each check stalls the device: each proposal is
        accepted with probability above 0.65 at any kappa and m, so for training-sized batches
        SYNC_FREE_ROUNDS proposals per draw are drawn at once and the first accepted is kept,
        with no check (a draw with none accepted, probability below 0.35**24 ~ 1e-11, keeps
        its first proposal); larger batches, where the extra proposals would cost more than a
        check, draw CHECK_EVERY rounds between checks.
        """
        kappa = kappa.detach().double()
        free = checks_are_free(kappa)
        if not free and kappa.numel() <= SYNC_FREE_MAX_DRAWS:
            eps, _ = self._first_accepted(kappa, SYNC_FREE_ROUNDS)
            return eps.to(self.concentration.dtype)
        rounds = 1 if free else CHECK_EVERY
        eps = torch.full_like(kappa, 0.5)
        done = torch.zeros_like(kappa, dtype=torch.bool)
        for _ in range(0, MAX_REJECTION_ROUNDS, rounds):
            proposal, accepted = self._first_accepted(kappa, rounds)
            eps = torch.where(accepted & ~done, proposal, eps)
            done = done | accepted
            if bool(done.all()):  # one host sync per block of rounds
                return eps.to(self.concentration.dtype)
        raise RuntimeError("von Mises-Fisher rejection sampler did not accept every draw")

    def _first_accepted(self, kappa: Tensor, rounds: int) -> tuple[Tensor, Tensor]:
        """`rounds` proposals per element of kappa (float64): the first accepted one (else the
        first one) and whether any was accepted, both of kappa's shape."""
        m1 = float(self.dim - 1)
        root = torch.sqrt(4.0 * kappa * kappa + m1 * m1)
        b = m1 / (2.0 * kappa + root)  # = (-2 kappa + root) / (m - 1) without cancellation
        a = (m1 + 2.0 * kappa + root) / 4.0
        d = 4.0 * a * b / (1.0 + b) - m1 * math.log(m1)
        half = torch.full_like(kappa, 0.5 * m1)
        e = torch.distributions.Beta(half, half, validate_args=False).sample((rounds,))  # (R, *K)
        t = 2.0 * a * b / (1.0 - (1.0 - b) * e)
        accept = m1 * torch.log(t) - t + d >= torch.log(torch.rand_like(e))
        first = accept.to(torch.uint8).argmax(0, keepdim=True)  # the first True (0 when none)
        return e.gather(0, first).squeeze(0), accept.any(0)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Reparameterised samples (*sample_shape, *B, m) on the sphere."""
        shape = self._extended_shape(sample_shape)[:-1]
        kappa = self.concentration.expand(shape)
        eps = self._accepted_eps(kappa)
        m1 = float(self.dim - 1)
        b = m1 / (2.0 * kappa + torch.sqrt(4.0 * kappa * kappa + m1 * m1))
        denom = 1.0 - (1.0 - b) * eps
        cos = 1.0 - 2.0 * b * eps / denom  # w, with 1 - w computed without cancellation
        sin = 2.0 * torch.sqrt(b * eps * (1.0 - eps)) / denom  # sqrt(1 - w^2) = sqrt((1-w)(1+w))
        return _around(self.loc, cos, sin)


MAX_REJECTION_ROUNDS = 1000
SYNC_FREE_ROUNDS = 24  # proposals per draw when no host sync is spent on checking
SYNC_FREE_MAX_DRAWS = 2**16  # draws up to which those proposals are cheaper than a sync
CHECK_EVERY = 4  # rounds between acceptance checks for larger batches on accelerators


class PowerSpherical(_DirectionalDistribution):
    """Power spherical distribution on S^{m-1} (De Cao & Aziz, 2020), rejection-free.

    q(z | mu, kappa) = (1 + mu^T z)^kappa / N(kappa, m),
    N = 2^{alpha + beta} pi^beta Gamma(alpha) / Gamma(alpha + beta),
    alpha = (m - 1) / 2 + kappa, beta = (m - 1) / 2. loc mu (*B, m) unit, concentration
    kappa (*B,) >= 0; batch (*B,), event (m,).

    rsample: s ~ Beta(beta, alpha) (reparameterised), mu^T z = 1 - 2 s, the rest uniform on
    the tangent sphere; sampling s = (1 - t) rather than t ~ Beta(alpha, beta) keeps 1 - w exact
    when kappa is large. Entropy H = log N - kappa (log 2 + psi(alpha) - psi(alpha + beta)).
    """

    arg_constraints = {"loc": constraints.real_vector, "concentration": constraints.nonnegative}
    support = sphere
    has_rsample = True

    def _alpha_beta64(self) -> tuple[Tensor, float]:
        beta = 0.5 * (self.dim - 1)
        return self.concentration.double() + beta, beta

    def _log_normalizer64(self) -> Tensor:
        """log N(kappa, m) in float64, (*B,)."""
        alpha, beta = self._alpha_beta64()
        return (
            (alpha + beta) * math.log(2.0)
            + beta * math.log(math.pi)
            + torch.lgamma(alpha)
            - torch.lgamma(alpha + beta)
        )

    @property
    def mean(self) -> Tensor:
        """E[z] = kappa / (kappa + m - 1) mu: (*B, m)."""
        kappa = self.concentration
        return (kappa / (kappa + self.dim - 1)).unsqueeze(-1) * self.loc

    def log_prob(self, value: Tensor) -> Tensor:
        """kappa log(1 + mu^T z) - log N for z (*S, *B, m) -> (*S, *B)."""
        if self._validate_args:
            self._validate_sample(value)
        log_norm = self._log_normalizer64().to(self.loc.dtype)
        return self.concentration * torch.log1p((self.loc * value).sum(-1)) - log_norm

    def entropy(self) -> Tensor:
        """H = log N - kappa (log 2 + psi(alpha) - psi(alpha + beta)), shape (*B,)."""
        alpha, beta = self._alpha_beta64()
        mean_log = math.log(2.0) + torch.digamma(alpha) - torch.digamma(alpha + beta)  # E log(1 + mu^T z)
        return (self._log_normalizer64() - self.concentration.double() * mean_log).to(self.loc.dtype)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Reparameterised samples (*sample_shape, *B, m) on the sphere."""
        beta = 0.5 * (self.dim - 1)
        kappa = self.concentration
        beta_draws = torch.distributions.Beta(torch.full_like(kappa, beta), kappa + beta, validate_args=False)
        s = beta_draws.rsample(sample_shape)
        s = s.clamp(0.0, 1.0)
        return _around(self.loc, 1.0 - 2.0 * s, 2.0 * torch.sqrt(s * (1.0 - s)))


class HypersphericalUniform(Distribution):
    """Uniform distribution on S^{dim-1}: p(z) = 1 / |S^{dim-1}|, batch (), event (dim,).

    Sampled by normalising a standard Gaussian vector (Muller, 1959).
    """

    arg_constraints: dict = {}
    support = sphere
    has_rsample = True

    def __init__(
        self,
        dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if dim < 2:
            raise ValueError(f"a sphere S^(dim-1) needs dim >= 2, not {dim}")
        self.dim = dim
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.get_default_dtype()
        super().__init__(torch.Size(), torch.Size([dim]), validate_args=validate_args)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Samples (*sample_shape, dim), unit vectors."""
        x = torch.randn(*sample_shape, self.dim, device=self.device, dtype=self.dtype)
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-30)

    def log_prob(self, value: Tensor) -> Tensor:
        """-log |S^{dim-1}| for every z (*S, dim) -> (*S,)."""
        if self._validate_args:
            self._validate_sample(value)
        log_density = -log_sphere_area(self.dim)
        return torch.full(value.shape[:-1], log_density, dtype=value.dtype, device=value.device)

    def entropy(self) -> Tensor:
        """log |S^{dim-1}|, a 0-d tensor."""
        return torch.tensor(log_sphere_area(self.dim), dtype=self.dtype, device=self.device)


def _check_same_sphere(q: VonMisesFisher | PowerSpherical, p: HypersphericalUniform) -> None:
    if q.dim != p.dim:
        raise ValueError(f"KL between distributions on spheres in R^{q.dim} and R^{p.dim}")


@register_kl(VonMisesFisher, HypersphericalUniform)
def _kl_vmf_uniform(q: VonMisesFisher, p: HypersphericalUniform) -> Tensor:
    """KL(vMF(mu, kappa) || U(S^{m-1})) = kappa A_m(kappa) + log C_m(kappa) + log |S^{m-1}|."""
    _check_same_sphere(q, p)
    log_c, mean_cosine = q._log_normalizer_and_mean_cosine64()
    kl = q.concentration.double() * mean_cosine + log_c + log_sphere_area(q.dim)
    return kl.to(q.loc.dtype)


@register_kl(PowerSpherical, HypersphericalUniform)
def _kl_power_spherical_uniform(q: PowerSpherical, p: HypersphericalUniform) -> Tensor:
    """KL(PS(mu, kappa) || U(S^{m-1})) = -H(PS) + log |S^{m-1}| (De Cao & Aziz, 2020)."""
    _check_same_sphere(q, p)
    alpha, beta = q._alpha_beta64()
    mean_log = math.log(2.0) + torch.digamma(alpha) - torch.digamma(alpha + beta)
    kl = q.concentration.double() * mean_log - q._log_normalizer64() + log_sphere_area(q.dim)
    return kl.to(q.loc.dtype)
