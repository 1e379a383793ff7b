"""Distributions torch lacks, and the one helper that computes every KL term."""

from __future__ import annotations

from torch import Tensor
from torch.distributions import Distribution, kl_divergence

_ANALYTIC_KL: dict[tuple[type, type], bool] = {}


def kl_term(q: Distribution, p: Distribution, z: Tensor) -> Tensor:
    """KL(q || p) per example, shape q.batch_shape (B,).

    Analytic `kl_divergence(q, p)` where torch (or a `@register_kl` of ours) knows the
    pair; otherwise the single-sample Monte Carlo estimate log q(z) - log p(z) at the
    reparameterised sample z ~ q (shape (B, L)) that the reconstruction term also used.
    """
    pair = (type(q), type(p))
    if _ANALYTIC_KL.get(pair, True):
        try:
            kl = kl_divergence(q, p)
            _ANALYTIC_KL[pair] = True
            return kl
        except NotImplementedError:
            _ANALYTIC_KL[pair] = False
    return q.log_prob(z) - p.log_prob(z)
