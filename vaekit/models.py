"""VAE models: compose encoder, posterior, prior, decoder and likelihood.

Every model's forward(x) returns an `ELBO` of per-example tensors in nats, and its
`weight_terms(x, k)` the parts of k importance weights; the training losses are defined in
one place only, `vaekit.objectives` (ELBO, make_elbo and log_weights_of are re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from vaekit.errors import VaekitError
from vaekit.kl import kl_term
from vaekit.latents import mean_of
from vaekit.likelihoods import Likelihood
from vaekit.net_precision import run_net
from vaekit.objectives import ELBO, log_weights_of, make_elbo, stopped
from vaekit.posteriors import GaussianPosterior, Posterior
from vaekit.priors import Prior, VampPrior

# Upper bound on decoder output elements per chunk of the importance-weighted estimate
# (2**24 float32 = 64 MiB per tensor), so memory stays bounded whatever k and B are.
IW_CHUNK_ELEMENTS = 2**24


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

    With `conditional` (model.conditional=true) it is the conditional VAE (Sohn et al., 2015)
    of labels y in 0..num_classes-1: p(x|z, y) p(z), q(z|x, y), so its ELBO bounds log p(x|y).
    q sees the encoder's features plus a learned linear embedding of one-hot(y), the decoder
    concat(z, one-hot(y)); p(z) stays unconditional. Every method then takes the labels y (B,)
    int64 of its examples; an unconditional model takes none.
    """

    def __init__(
        self,
        latent_dim: int,
        data_shape: tuple[int, ...],
        net: object,
        prior: Prior,
        make_posterior: Callable[..., Posterior],
        likelihood: Likelihood,
        conditional: bool = False,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if conditional and num_classes < 2:
            raise VaekitError(
                f"model.conditional=true needs at least 2 classes of labels, not {num_classes}."
            )
        if conditional and isinstance(prior, VampPrior):
            raise VaekitError(
                "prior=vampprior mixes the posteriors of unlabelled pseudo-inputs, which a conditional "
                "q(z|x, y) cannot give: use prior=standard, mog or flow with model.conditional=true."
            )
        self.latent_dim = latent_dim
        self.data_shape = tuple(data_shape)
        self.conditional = bool(conditional)
        self.num_classes = int(num_classes) if conditional else 0
        self.encoder = net.encoder(self.data_shape)
        if self.conditional:  # one-hot(y) (B, C) -> (B, hidden), added to the encoder's features
            self.label_embedding = nn.Linear(self.num_classes, net.hidden_dim)
        self.posterior = make_posterior(hidden_dim=net.hidden_dim)
        self.prior = prior
        self.decoder = net.decoder(latent_dim + self.num_classes, self.data_shape, likelihood.num_params)
        self.likelihood = likelihood
        check_pairing(prior, self.posterior)
        prior.bind_posterior(self.q_z)

    def one_hot(self, y: Tensor | None, what: str) -> Tensor | None:
        """one-hot(y) (B, C) float32 for a conditional model (None for an unconditional one);
        refuses, in one sentence, missing labels (or labels given to an unconditional model)."""
        if not self.conditional:
            if y is not None:
                raise VaekitError(
                    f"{what} got labels y, but this VAE is not conditional (model.conditional=false)."
                )
            return None
        if y is None:
            raise VaekitError(
                f"{what} of a conditional VAE (model.conditional=true) needs the labels y of its examples."
            )
        classes = torch.arange(self.num_classes, device=y.device)
        return (y.reshape(-1, 1) == classes).float()  # no host sync; labels come checked from the data

    def q_z(self, x: Tensor, y: Tensor | None = None) -> Distribution:
        """q(z|x) (q(z|x, y) when conditional, y (B,)): batch (B,), event (L,)."""
        h = run_net(self.encoder, x)  # (B, hidden)
        labels = self.one_hot(y, "q(z|x, y)")
        if labels is not None:
            h = h + self.label_embedding(labels)
        return self.posterior(h)

    def p_x(self, z: Tensor, y: Tensor | None = None) -> Distribution:
        """p(x|z) (p(x|z, y) when conditional, y (N,)) for z (N, L): batch (N,), event = data shape."""
        labels = self.one_hot(y, "p(x|z, y)")
        if labels is not None:
            z = torch.cat([z, labels.to(z.dtype)], dim=-1)  # (N, L + C)
        return self.likelihood(run_net(self.decoder, z))

    def forward(self, x: Tensor, beta: float = 1.0, free_bits: float = 0.0, y: Tensor | None = None) -> ELBO:
        """x (B, *shape) (and labels y (B,) when conditional) -> ELBO of per-example terms (B,);
        see make_elbo for beta, free_bits."""
        q_z = self.q_z(x, y)
        z = q_z.rsample()  # (B, L)
        rec = -self.p_x(z, y).log_prob(x)
        return make_elbo(rec, {"z": kl_term(q_z, self.prior(), z)}, beta, free_bits)

    @torch.no_grad()
    def sample(self, n: int, draw: bool = False, y: Tensor | None = None) -> Tensor:
        """Mean of p(x|z) (a draw from it with `draw`) for z ~ p(z): (n, *shape) in [0, 1].

        A conditional model decodes with the labels y (n,); without them, the classes in
        turn: y_i = i mod num_classes."""
        z = self.prior().sample((n,))
        if self.conditional and y is None:
            y = torch.arange(n, device=z.device) % self.num_classes
        return shown(self.p_x(z, y), draw)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, draw: bool = False, y: Tensor | None = None) -> Tensor:
        """Mean of p(x|z) (a draw with `draw`) at the posterior mean of q(z|x): (B, *shape);
        a conditional model takes x's labels y (B,)."""
        return shown(self.p_x(mean_of(self.q_z(x, y)), y), draw)

    def weight_terms(self, x: Tensor, k: int, y: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """For k draws z_j ~ q(z|x): log p(x|z_j) (k, B) and {"z": log q(z_j|x) - log p(z_j)}
        (k, B). log w_j = log p(x|z_j) - the level terms; see `log_weights_of`. A conditional
        model takes the labels y (B,) and conditions q and p(x|z) on them."""
        log_p_x, levels, _ = self._draw_terms(x, k, stop_q=False, y=y)
        return log_p_x, levels

    @property
    def dreg_ready(self) -> bool:
        """Whether `dreg_terms` applies: q(z|x) is a diagonal Gaussian (posterior=gaussian)."""
        return isinstance(self.posterior, GaussianPosterior)

    def dreg_terms(
        self, x: Tensor, k: int, y: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """`weight_terms` with log q(z_j|x) evaluated at q's parameters detached, and the draws
        z (k, B, L): what the DReG gradient needs (`vaekit.objectives.IWAE`)."""
        return self._draw_terms(x, k, stop_q=True, y=y)

    def _draw_terms(
        self, x: Tensor, k: int, stop_q: bool, y: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """(log p(x|z_j) (k, B), {"z": log q(z_j|x) - log p(z_j)} (k, B), z (k, B, L)) for k draws."""
        q_z = self.q_z(x, y)
        z = q_z.rsample((k,))  # (k, B, L)
        kl = (stopped(q_z) if stop_q else q_z).log_prob(z) - self.prior().log_prob(z)  # (k, B)
        x_rep = x.expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])
        y_rep = None if y is None else y.expand(k, *y.shape).reshape(-1)  # (k * B,), as x_rep
        log_p_x = self.p_x(z.reshape(-1, z.shape[-1]), y_rep).log_prob(x_rep).view(k, -1)
        return log_p_x, {"z": kl}, z

    def log_weights(self, x: Tensor, k: int, y: Tensor | None = None) -> Tensor:
        """log p(x, z_j) - log q(z_j|x) for k samples z_j ~ q(z|x): shape (k, B) (given y (B,)
        when conditional: log p(x, z_j|y) - log q(z_j|x, y))."""
        return log_weights_of(*self.weight_terms(x, k, y))

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, k: int, y: Tensor | None = None) -> Tensor:
        """Importance-weighted estimate of log p(x) (Burda et al., 2016), shape (B,); of
        log p(x|y) for a conditional model given the labels y (B,).

        log p(x) ~= logsumexp_j [log p(x, z_j) - log q(z_j|x)] - log k, z_j ~ q(z|x).
        Samples are drawn in chunks so at most IW_CHUNK_ELEMENTS decoder outputs live at once.
        """
        if y is None:
            return iw_log_likelihood(self.log_weights, x, k, decoder_outputs(self))
        return iw_log_likelihood(_Given(self.log_weights, y), x, k, decoder_outputs(self))

    @torch.no_grad()
    def posterior_means(self, x: Tensor, y: Tensor | None = None) -> dict[str, Tensor]:
        """E_q[z|x] (E_q[z|x, y] given y (B,) when conditional) for x (B, *shape): {"z": (B, L)},
        the input of the active-units count."""
        return {"z": mean_of(self.q_z(x, y))}


class _Given:
    """log_weights(x, k) with the labels y fixed: the (x, k) -> (k, B) map `iw_log_likelihood` takes
    (a class, not a lambda: picklable)."""

    def __init__(self, log_weights: Callable[..., Tensor], y: Tensor) -> None:
        self.log_weights, self.y = log_weights, y

    def __call__(self, x: Tensor, k: int) -> Tensor:
        return self.log_weights(x, k, self.y)
