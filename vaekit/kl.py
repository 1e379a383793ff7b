"""The one helper that computes every KL term of an ELBO: analytic where the pair of
distributions has a closed form, otherwise a single-sample Monte Carlo estimate with a control
variate whose expectation is known."""

from __future__ import annotations

from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    MixtureSameFamily,
    Normal,
    TransformedDistribution,
    kl_divergence,
)

from vaekit.flows import FlowDistribution


def analytic_kl(q: Distribution, p: Distribution) -> Tensor | None:
    """KL(q || p) in closed form (torch's or a `@register_kl` of ours), or None where the
    pair has none.

    Nothing is cached here: whether a pair has a closed form can depend on more than the two
    outer types (Independent pairs are decided by their inner distributions, transformed ones
    by their transforms), and torch already memoizes its lookup by type pair."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


def kl_term(q: Distribution, p: Distribution, z: Tensor) -> Tensor:
    """KL(q || p) per example, shape q.batch_shape (B,), for the reparameterised z ~ q (B, L)
    that the reconstruction term also used.

    Analytic where the pair has a closed form. Otherwise the single-sample estimate
    log q(z) - log p(z) with a control variate (`control_variate`): unbiased, and equal to the
    closed form while q is still its Gaussian base and p its reference (flows start at the
    identity), so a learnable prior or a flow posterior starts training on the same low-noise
    gradient as a Gaussian posterior with the standard prior.
    """
    kl = analytic_kl(q, p)
    if kl is not None:
        return kl
    estimate = q.log_prob(z) - p.log_prob(z)
    correction = control_variate(q, p, z)
    return estimate if correction is None else estimate - correction


def control_variate(q: Distribution, p: Distribution, z: Tensor) -> Tensor | None:
    """c = [log q0(z0) - log r(z0)] - KL(q0 || r), shape (B,), with E_q[c] = 0; or None.

    q0 is q's Gaussian base (q itself unless q is a flow) and z0 the base draw under z; r is a
    reference near p whose KL from q0 has a closed form (p itself, else `stand_in_for(p)`).
    Subtracting c leaves the estimate unbiased and removes the noise that log q - log p shares
    with log q0 - log r. The closed form KL(q0 || r) is computed once per call.
    """
    base, z0 = q, z
    if isinstance(q, FlowDistribution):
        base, z0 = q.base, q.base_sample(z)
    if z0 is None:
        return None
    for reference in (p, stand_in_for(p)):  # p itself where its KL from q0 has a closed form
        kl0 = None if reference is None else analytic_kl(base, reference)
        if kl0 is not None:
            return base.log_prob(z0) - reference.log_prob(z0) - kl0
    return None


def stand_in_for(p: Distribution) -> Distribution | None:
    """A Gaussian near p: the base N(0, I) of a flow prior, the Gaussian with the moments of a
    Gaussian mixture (mixture of Gaussians, VampPrior); None otherwise."""
    if isinstance(p, TransformedDistribution):
        return p.base_dist
    if isinstance(p, MixtureSameFamily):
        return moment_matched_normal(p)
    return None


def moment_matched_normal(p: MixtureSameFamily) -> Distribution | None:
    """N(m, diag v) with the mean and per-dimension variance of a mixture of diagonal Gaussians,

        m = sum_k pi_k mu_k,   v = sum_k pi_k (sigma_k^2 + mu_k^2) - m^2;

    batch (), event (L,). None for mixtures of other families."""
    components = p.component_distribution
    if type(components) is not Independent or not isinstance(components.base_dist, Normal):
        return None
    if len(p.event_shape) != 1 or len(p.batch_shape) != 0:
        return None
    weights = p.mixture_distribution.probs.unsqueeze(-1)  # (K, 1)
    loc, scale = components.base_dist.loc, components.base_dist.scale  # (K, L)
    mean = (weights * loc).sum(0)
    variance = (weights * (scale.square() + loc.square())).sum(0) - mean.square()
    return Independent(Normal(mean, variance.clamp(min=1e-12).sqrt(), validate_args=False), 1)
