"""q(z|x): a head on the encoder's features h (B, H) that returns a Distribution with
batch_shape (B,) and event_shape (L,), reparameterised (rsample).

Options: gaussian; flows after a Gaussian (planar, sylvester, iaf), whose log q is exact for
their own samples (vaekit.flows.FlowDistribution); and on the sphere S^{L-1} (vmf,
power_spherical), which pair with prior=uniform_sphere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from vaekit.errors import VaekitError
from vaekit.flows import (
    FlowDistribution,
    PlanarTransform,
    SylvesterTransform,
    householder_product,
    orthogonalize,
    permutation_matrix,
    sylvester_triangular,
)
from vaekit.flows.iaf import GATE_BIAS, ConditionalAffineAutoregressive
from vaekit.rng import own_rng
from vaekit.shards import standard_normal
from vaekit.spherical import PowerSpherical, VonMisesFisher


class Posterior(nn.Module):
    """Base class: maps encoder features h (B, hidden_dim) to q(z|x)."""

    on_sphere: bool = False  # True for posteriors on the unit sphere S^{L-1}

    def __init__(self, hidden_dim: int, latent_dim: int) -> None:
        super().__init__()
        if latent_dim < 1:
            raise VaekitError(f"model.latent_dim must be at least 1, not {latent_dim}.")
        self.hidden_dim = hidden_dim
        self.latent_dim = latent_dim

    def forward(self, h: Tensor) -> Distribution:  # pragma: no cover - interface
        raise NotImplementedError


class GaussianPosterior(Posterior):
    """q(z|x) = N(mu(h), diag(exp(log_var(h)))), one linear layer on h."""

    def __init__(self, hidden_dim: int, latent_dim: int) -> None:
        super().__init__(hidden_dim, latent_dim)
        self.head = nn.Linear(hidden_dim, 2 * latent_dim)

    def forward(self, h: Tensor) -> Distribution:
        mu, log_var = self.head(h).chunk(2, dim=-1)  # (B, L) each
        return diagonal_normal(mu, log_var)


def diagonal_normal(mu: Tensor, log_var: Tensor) -> Distribution:
    """N(mu, diag(exp(log_var))): batch (*B,), event (L,) for mu, log_var (*B, L). The one
    diagonal Gaussian of q(z|x): the Gaussian posterior, the base of the flow posteriors, and
    the conditional levels of the hierarchical models."""
    return Independent(SplittableNormal(mu, torch.exp(0.5 * log_var), validate_args=False), 1)


class SplittableNormal(Normal):
    """torch's Normal, whose reparameterised draws z = loc + eps * scale take eps from
    `vaekit.shards.standard_normal`: torch's own noise in one process, and with a batch split
    over processes each one's rows of the whole batch's noise (so the split changes no draw)."""

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = standard_normal(shape, len(sample_shape), self.loc.dtype, self.loc.device)
        return self.loc + eps * self.scale


def _at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise VaekitError(f"posterior.{name} must be at least {minimum}, not {value}.")


class PlanarPosterior(Posterior):
    """q_K(z|x): z_0 ~ N(mu(h), diag sigma^2(h)), then `num_flows` planar steps
    (Rezende & Mohamed, 2015) whose u, w, b are amortized: linear in the encoder features h.
    The u outputs start at 0, so every step starts as the identity and the untrained q_K is
    its Gaussian base (whose KL to a Gaussian prior `vaekit.kl` then computes in closed form).

    Returns a FlowDistribution: batch (B,), event (L,); log q exact for its own samples.
    """

    def __init__(self, hidden_dim: int, latent_dim: int, num_flows: int = 8) -> None:
        super().__init__(hidden_dim, latent_dim)
        _at_least("num_flows", num_flows, 1)
        self.num_flows = num_flows
        self.base = nn.Linear(hidden_dim, 2 * latent_dim)  # the Gaussian posterior's head, same init
        with own_rng():  # the decoder then starts as with posterior=gaussian (a paired comparison)
            self.flow_params = nn.Linear(hidden_dim, num_flows * (2 * latent_dim + 1))  # u, w, b per step
        with torch.no_grad():  # u = 0: identity steps at the start
            u_rows = self.flow_params.weight.view(num_flows, 2 * latent_dim + 1, hidden_dim)[:, :latent_dim]
            u_rows.zero_()
            self.flow_params.bias.view(num_flows, 2 * latent_dim + 1)[:, :latent_dim].zero_()

    def forward(self, h: Tensor) -> Distribution:
        latent = self.latent_dim
        mu, log_var = self.base(h).chunk(2, dim=-1)  # (B, L) each
        params = self.flow_params(h).unflatten(-1, (self.num_flows, 2 * latent + 1))  # (B, F, 2L+1)
        transforms = [
            PlanarTransform(p[..., :latent], p[..., latent : 2 * latent], p[..., 2 * latent])
            for p in params.unbind(-2)
        ]
        return FlowDistribution(diagonal_normal(mu, log_var), transforms)


class SylvesterPosterior(Posterior):
    """q_K(z|x): z_0 ~ N(mu(h), diag sigma^2(h)), then `num_flows` Sylvester steps (van den Berg
    et al., 2018) z' = z + Q R tanh(R~ Q^T z + b), every parameter amortized from h.

    R, R~ (M, M) upper triangular share one M x M output (R takes its strict upper triangle, R~
    the strict lower one transposed), diagonals in (-1, 1) so each step is invertible
    (`vaekit.flows.sylvester_triangular`).
    Q (L, M) by `kind`:
      orthogonal:  M = num_ortho_vecs (default L) orthonormal columns by Bjorck iteration;
      householder: M = L, a product of num_householder reflections;
      triangular:  M = L, the identity on even steps and the reversal permutation on odd ones.
    """

    KINDS = ("orthogonal", "householder", "triangular")

    def __init__(
        self,
        hidden_dim: int,
        latent_dim: int,
        num_flows: int = 4,
        kind: str = "orthogonal",
        num_ortho_vecs: int | None = None,
        num_householder: int = 8,
    ) -> None:
        super().__init__(hidden_dim, latent_dim)
        _at_least("num_flows", num_flows, 1)
        if kind not in self.KINDS:
            raise VaekitError(f"posterior.kind must be one of {', '.join(self.KINDS)}, not {kind}.")
        _at_least("num_householder", num_householder, 1)
        size = latent_dim if kind != "orthogonal" or num_ortho_vecs is None else num_ortho_vecs
        if not 1 <= size <= latent_dim:
            raise VaekitError(
                f"posterior.num_ortho_vecs must be between 1 and model.latent_dim={latent_dim}, not {size}."
            )
        self.num_flows = num_flows
        self.kind = kind
        self.size = size  # M
        q_params = {"orthogonal": latent_dim * size, "householder": num_householder * latent_dim}
        # per step: R/R~ off-diagonals (M*M), diag R, diag R~, b (M each), Q's raw parameters
        self.splits = [size * size, size, size, size, q_params.get(kind, 0)]
        self.base = nn.Linear(hidden_dim, 2 * latent_dim)  # the Gaussian posterior's head, same init
        with own_rng():  # the decoder then starts as with posterior=gaussian (a paired comparison)
            self.flow_params = nn.Linear(hidden_dim, num_flows * sum(self.splits))

    def orthogonal_matrices(self, raw: Tensor) -> list[Tensor]:
        """Q of every step from its raw parameters (*B, F, P_q): F tensors (*B, L, M) or (L, M)."""
        latent, size = self.latent_dim, self.size
        if self.kind == "orthogonal":  # all steps in one batched iteration
            return list(orthogonalize(raw.unflatten(-1, (latent, size))).unbind(-3))
        if self.kind == "householder":
            return list(householder_product(raw.unflatten(-1, (-1, latent))).unbind(-3))
        return [permutation_matrix(latent, step % 2 == 1, raw) for step in range(self.num_flows)]

    def forward(self, h: Tensor) -> Distribution:
        size = self.size
        mu, log_var = self.base(h).chunk(2, dim=-1)  # (B, L) each
        params = self.flow_params(h).unflatten(-1, (self.num_flows, sum(self.splits)))  # (B, F, P)
        full, diag_r, diag_rt, b, q_raw = params.split(self.splits, dim=-1)
        full = full.unflatten(-1, (size, size))  # (B, F, M, M)
        r, r_tilde = sylvester_triangular(full, diag_r, diag_rt)
        qs = self.orthogonal_matrices(q_raw)
        transforms = [
            SylvesterTransform(q, r_k, rt_k, b_k)
            for q, r_k, rt_k, b_k in zip(qs, r.unbind(-3), r_tilde.unbind(-3), b.unbind(-2), strict=True)
        ]
        return FlowDistribution(diagonal_normal(mu, log_var), transforms)


class IAFPosterior(Posterior):
    """q_K(z|x) with inverse autoregressive flow (Kingma et al., 2016): the encoder gives mu,
    log sigma^2 and a context c(h) (context_dim); `num_flows` IAF steps, each a MADE with
    `made_layers` hidden layers of `made_hidden` units that takes c as an extra input, the
    variable order reversed between steps, and gates sigmoid(s + gate_bias). The flow's weights
    are shared by all x; only the context depends on x. Batch (B,), event (L,).
    """

    def __init__(
        self,
        hidden_dim: int,
        latent_dim: int,
        num_flows: int = 4,
        context_dim: int = 64,
        made_hidden: int = 128,
        made_layers: int = 2,
        gate_bias: float = GATE_BIAS,
    ) -> None:
        super().__init__(hidden_dim, latent_dim)
        sizes = (num_flows, context_dim, made_hidden, made_layers)
        for name, value in zip(
            ("num_flows", "context_dim", "made_hidden", "made_layers"), sizes, strict=True
        ):
            _at_least(name, value, 1)
        if not math.isfinite(gate_bias):
            raise VaekitError(f"posterior.gate_bias must be a finite number, not {gate_bias}.")
        self.context_dim = context_dim
        self.base = nn.Linear(hidden_dim, 2 * latent_dim)  # the Gaussian posterior's head, same init
        with own_rng():  # the decoder then starts as with posterior=gaussian (a paired comparison)
            self.context = nn.Linear(hidden_dim, context_dim)
            self.steps = nn.ModuleList(
                ConditionalAffineAutoregressive(
                    latent_dim, context_dim, made_hidden, made_layers, step % 2 == 1, gate_bias
                )
                for step in range(num_flows)
            )

    def forward(self, h: Tensor) -> Distribution:
        mu, log_var = self.base(h).chunk(2, dim=-1)  # (B, L) each
        context = self.context(h)  # (B, context_dim)
        transforms = [step.condition(context) for step in self.steps]
        return FlowDistribution(diagonal_normal(mu, log_var), transforms)


class SphericalPosterior(Posterior):
    """Base of posteriors on the sphere S^{L-1}: mean direction mu = normalize(linear(h)) (B, L),
    concentration kappa = softplus(linear(h)) + min_concentration (B,)."""

    on_sphere = True
    option = ""  # the config option, for messages

    def __init__(self, hidden_dim: int, latent_dim: int, min_concentration: float = 1.0) -> None:
        super().__init__(hidden_dim, latent_dim)
        if latent_dim < 2:
            raise VaekitError(
                f"posterior={self.option} lives on the sphere S^(L-1) and needs model.latent_dim "
                f"of at least 2, not {latent_dim}."
            )
        if min_concentration < 0:
            raise VaekitError(f"posterior.min_concentration must be 0 or more, not {min_concentration}.")
        self.min_concentration = float(min_concentration)
        self.head = nn.Linear(hidden_dim, latent_dim + 1)

    def direction_and_concentration(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """mu (B, L) unit vectors and kappa (B,) > 0 from h (B, H)."""
        out = self.head(h)
        loc = F.normalize(out[..., :-1], dim=-1)
        # the floor keeps kappa > 0 even where softplus underflows and min_concentration is 0
        kappa = (F.softplus(out[..., -1]) + self.min_concentration).clamp_min(1e-6)
        return loc, kappa


class VonMisesFisherPosterior(SphericalPosterior):
    """q(z|x) = vMF(mu(h), kappa(h)) on S^{L-1} (Davidson et al., 2018); pair with
    prior=uniform_sphere (analytic KL). Batch (B,), event (L,)."""

    option = "vmf"

    def forward(self, h: Tensor) -> Distribution:
        return VonMisesFisher(*self.direction_and_concentration(h), validate_args=False)


class PowerSphericalPosterior(SphericalPosterior):
    """q(z|x) = PowerSpherical(mu(h), kappa(h)) on S^{L-1} (De Cao & Aziz, 2020), rejection-free;
    pair with prior=uniform_sphere (analytic KL). Batch (B,), event (L,)."""

    option = "power_spherical"

    def forward(self, h: Tensor) -> Distribution:
        return PowerSpherical(*self.direction_and_concentration(h), validate_args=False)
