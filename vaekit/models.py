"""VAE models: compose encoder, posterior, prior, decoder and likelihood.

Every model's forward(x) returns an `ELBO` of per-example tensors in nats; the training
loss is defined in one place only, `make_elbo`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from vaekit.errors import VaekitError
from vaekit.kl import kl_term
from vaekit.latents import mean_of
from vaekit.likelihoods import Likelihood
from vaekit.net_precision import run_net
from vaekit.posteriors import Posterior
from vaekit.priors import Prior

# Upper bound on decoder output elements per chunk of the importance-weighted estimate
# (2**24 float32 = 64 MiB per tensor), so memory stays bounded whatever k and B are.
IW_CHUNK_ELEMENTS = 2**24


@dataclass(frozen=True)
class ELBO:
    """Per-example terms (B,) in nats. nelbo = rec + kl; loss is what training minimises
    (equal to nelbo unless KL warm-up or free bits are on, see `make_elbo`)."""

    loss: Tensor
    rec: Tensor
    kl: Tensor
    kl_per_level: dict[str, Tensor]

    @property
    def nelbo(self) -> Tensor:
        """-ELBO = -E_q[log p(x|z)] + KL(q(z|x) || p(z)), shape (B,)."""
        return self.rec + self.kl


def make_elbo(
    rec: Tensor, kl_per_level: dict[str, Tensor], beta: float = 1.0, free_bits: float = 0.0
) -> ELBO:
    """The one place the objective is defined.

    loss = rec + beta * sum_levels max(KL_level, free_bits): beta < 1 during KL warm-up
    (Sonderby et al., 2016); the free-bits floor (Kingma et al., 2016), in nats per level
    and example, stops the optimiser from pushing a level's KL below it (against collapse).
    The reported nelbo = rec + sum_levels KL_level is unaffected by either.
    """
    kl = sum(kl_per_level.values())
    penalty = kl if free_bits <= 0 else sum(k.clamp(min=free_bits) for k in kl_per_level.values())
    return ELBO(loss=rec + beta * penalty, rec=rec, kl=kl, kl_per_level=kl_per_level)


def shown(p_x: Distribution, draw: bool) -> Tensor:
    """What an image grid shows of p(x|z): its mean, or with `draw` a sample from it."""
    return p_x.sample() if draw else p_x.mean


def check_pairing(prior: Prior, posterior: Posterior) -> None:
    """Refuse, in one sentence, a posterior and a prior that live on different spaces."""
    if posterior.on_sphere and not prior.on_sphere:
        raise VaekitError(
            f"posterior={type(posterior).__name__} lives on the sphere, but "
            f"prior={type(prior).__name__} does not: use prior=uniform_sphere."
        )
    if prior.on_sphere and not posterior.on_sphere:
        raise VaekitError(
            f"prior={type(prior).__name__} lives on the sphere, but "
            f"posterior={type(posterior).__name__} does not: use posterior=vmf or power_spherical."
        )


def log_weights_of(log_p_x: Tensor, level_terms: dict[str, Tensor]) -> Tensor:
    """log w = log p(x|z) - sum_levels [log q(z_l|.) - log p(z_l|.)] = log p(x, z) - log q(z|x).

    The inputs are what every model's `weight_terms(x, k)` returns, each (k, B); averaged over
    the k draws, -log p(x|z) is the reconstruction term and each level term that level's KL.
    """
    return log_p_x - sum(level_terms.values())


def decoder_outputs(model: nn.Module) -> int:
    """Decoder outputs per (x, z) pair: data dimensions x the likelihood's parameters each."""
    return math.prod(model.data_shape) * model.likelihood.num_params


def iw_log_likelihood(
    log_weights: Callable[[Tensor, int], Tensor], x: Tensor, k: int, outputs_per_example: int
) -> Tensor:
    """Importance-weighted estimate of log p(x) (Burda et al., 2016), shape (B,).

    log p(x) ~= logsumexp_j log w_j - log k, with log_weights(x, k) -> log w (k, B) =
    log p(x, z_j) - log q(z_j|x) over all latent levels jointly. Samples are drawn in chunks
    so at most IW_CHUNK_ELEMENTS decoder outputs (outputs_per_example per example and
    sample) live at once, whatever k and B are. Shared by every model in vaekit.
    """
    chunk = max(1, IW_CHUNK_ELEMENTS // (x.shape[0] * outputs_per_example))
    parts = [log_weights(x, min(chunk, k - start)) for start in range(0, k, chunk)]
    return torch.logsumexp(torch.cat(parts), dim=0) - math.log(k)


class VAE(nn.Module):
    """One-level VAE (Kingma & Welling, 2014): p(x|z) p(z), q(z|x).

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)), single reparameterised sample.
    """

    def __init__(
        self,
        latent_dim: int,
        data_shape: tuple[int, ...],
        net: object,
        prior: Prior,
        make_posterior: Callable[..., Posterior],
        likelihood: Likelihood,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.data_shape = tuple(data_shape)
        self.encoder = net.encoder(self.data_shape)
        self.posterior = make_posterior(hidden_dim=net.hidden_dim)
        self.prior = prior
        self.decoder = net.decoder(latent_dim, self.data_shape, likelihood.num_params)
        self.likelihood = likelihood
        check_pairing(prior, self.posterior)
        prior.bind_posterior(self.q_z)

    def q_z(self, x: Tensor) -> Distribution:
        """q(z|x): batch (B,), event (L,)."""
        return self.posterior(run_net(self.encoder, x))

    def p_x(self, z: Tensor) -> Distribution:
        """p(x|z) for z (N, L): batch (N,), event = data shape."""
        return self.likelihood(run_net(self.decoder, z))

    def forward(self, x: Tensor, beta: float = 1.0, free_bits: float = 0.0) -> ELBO:
        """x (B, *shape) -> ELBO of per-example terms (B,); see make_elbo for beta, free_bits."""
        q_z = self.q_z(x)
        z = q_z.rsample()  # (B, L)
        rec = -self.p_x(z).log_prob(x)
        return make_elbo(rec, {"z": kl_term(q_z, self.prior(), z)}, beta, free_bits)

    @torch.no_grad()
    def sample(self, n: int, draw: bool = False) -> Tensor:
        """Mean of p(x|z) (a draw from it with `draw`) for z ~ p(z): (n, *shape) in [0, 1]."""
        z = self.prior().sample((n,))
        return shown(self.p_x(z), draw)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, draw: bool = False) -> Tensor:
        """Mean of p(x|z) (a draw with `draw`) at the posterior mean of q(z|x): (B, *shape)."""
        return shown(self.p_x(mean_of(self.q_z(x))), draw)

    def weight_terms(self, x: Tensor, k: int) -> tuple[Tensor, dict[str, Tensor]]:
        """For k draws z_j ~ q(z|x): log p(x|z_j) (k, B) and {"z": log q(z_j|x) - log p(z_j)}
        (k, B). log w_j = log p(x|z_j) - the level terms; see `log_weights_of`."""
        q_z = self.q_z(x)
        z = q_z.rsample((k,))  # (k, B, L)
        kl = q_z.log_prob(z) - self.prior().log_prob(z)  # (k, B)
        x_rep = x.expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])
        log_p_x = self.p_x(z.reshape(-1, z.shape[-1])).log_prob(x_rep).view(k, -1)
        return log_p_x, {"z": kl}

    def log_weights(self, x: Tensor, k: int) -> Tensor:
        """log p(x, z_j) - log q(z_j|x) for k samples z_j ~ q(z|x): shape (k, B)."""
        return log_weights_of(*self.weight_terms(x, k))

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, k: int) -> Tensor:
        """Importance-weighted estimate of log p(x) (Burda et al., 2016), shape (B,).

        log p(x) ~= logsumexp_j [log p(x, z_j) - log q(z_j|x)] - log k, z_j ~ q(z|x).
        Samples are drawn in chunks so at most IW_CHUNK_ELEMENTS decoder outputs live at once.
        """
        return iw_log_likelihood(self.log_weights, x, k, decoder_outputs(self))

    @torch.no_grad()
    def posterior_means(self, x: Tensor) -> dict[str, Tensor]:
        """E_q[z|x] for x (B, *shape): {"z": (B, L)}, the input of the active-units count."""
        return {"z": mean_of(self.q_z(x))}
