"""Hierarchical VAEs with latent levels z_1 (next to x) ... z_N (top).

TwoLevelVAE: the textbook bottom-up extension of the one-level VAE, prone to ignoring z_2.
TopDownVAE: a bottom-up deterministic path and a top-down path that the generative model and
the posterior share (Ladder VAE, Sonderby et al., 2016; NVAE, Vahdat & Kautz, 2020).

In both, the `prior` group is p(z_N) and the `posterior` group is the family of q(z_N | .);
the lower levels are diagonal Gaussians produced by the model. Every forward(x) returns an
`ELBO` whose `kl_per_level` has one entry per level, "z1" ... "zN", so collapse shows up in
TensorBoard (train/kl/z2 near 0) and in `posterior_means` (active units).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from vaekit.errors import VaekitError
from vaekit.kl import kl_term
from vaekit.latents import MC_MEAN_SAMPLES, mean_of
from vaekit.likelihoods import Likelihood
from vaekit.models import (
    ELBO,
    check_pairing,
    decoder_outputs,
    iw_log_likelihood,
    log_weights_of,
    make_elbo,
    shown,
)
from vaekit.net_precision import run_net
from vaekit.posteriors import Posterior, diagonal_normal
from vaekit.priors import Prior
from vaekit.shards import standard_normal

# Log-variances produced by the model are soft-clamped to (-LOG_VAR_BOUND, LOG_VAR_BOUND):
# a scale between e^-5 and e^5, so one bad step cannot send a KL term to infinity.
LOG_VAR_BOUND = 10.0


def level_names(num_levels: int) -> list[str]:
    """["z1", ..., "zN"], bottom (next to x) to top: the keys of `kl_per_level`."""
    return [f"z{i + 1}" for i in range(num_levels)]


def split_gaussian_params(params: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 2L) -> mean (B, L), log-variance (B, L) soft-clamped to +-LOG_VAR_BOUND."""
    mu, raw = params.chunk(2, dim=-1)
    return mu, LOG_VAR_BOUND * torch.tanh(raw / LOG_VAR_BOUND)


def relative_gaussian_kl(delta_mu: Tensor, log_var: Tensor, delta_log_var: Tensor) -> Tensor:
    """KL(N(mu + dmu, s^2 ds^2) || N(mu, s^2)) summed over the last dimension (NVAE, eq. 2):

        KL = 1/2 sum_l (dmu_l^2 / s_l^2 + ds_l^2 - log ds_l^2 - 1),  shapes (..., L) -> (...)

    It does not depend on mu, and on s only through dmu^2 / s^2: written in the relative
    parameters, it never subtracts two large log-variances.
    """
    terms = delta_mu.pow(2) * torch.exp(-log_var) + torch.exp(delta_log_var) - delta_log_var - 1
    return 0.5 * terms.sum(-1)


def check_sizes(latent_dims: Sequence[int], levels: int, latent_dim: int | None) -> list[int]:
    """Validate per-level sizes (bottom to top) against `levels`: one VaekitError sentence."""
    try:
        sizes = [int(d) for d in latent_dims]
    except TypeError:
        raise VaekitError(
            f"model.latent_dims must be a list of sizes, bottom to top (e.g. [16,8]), not {latent_dims}."
        ) from None
    if levels < 2:
        raise VaekitError(f"model.levels must be at least 2 for a hierarchical model, not {levels}.")
    if len(sizes) != levels:
        example = ",".join(str(max(1, 16 >> i)) for i in range(levels))
        raise VaekitError(
            f"model.levels={levels} needs {levels} latent sizes in model.latent_dims (bottom to top), "
            f"not {sizes}: e.g. model.latent_dims=[{example}]."
        )
    if min(sizes) < 1:
        raise VaekitError(f"every size in model.latent_dims must be at least 1, not {sizes}.")
    if latent_dim is not None and latent_dim != sizes[-1]:
        raise VaekitError(
            f"model.latent_dim={latent_dim} must be the top level's size, the last of "
            f"model.latent_dims={sizes}: set model.latent_dims instead."
        )
    return sizes


class Residual(nn.Module):
    """x + body(x) (He et al., 2016): the block learns a correction to its input."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def check_unconditional(conditional: bool, model: str) -> None:
    """Refuse, in one sentence, model.conditional=true for a hierarchical model (`model` its option;
    the constructors' num_classes, passed with it by `vaekit.build`, is never used)."""
    if conditional:
        raise VaekitError(
            f"model.conditional=true is built for model=vae (the one-level VAE), not for model={model}: "
            f"use model=vae or model.conditional=false."
        )


class HierarchicalVAE(nn.Module):
    """What both hierarchical models share: p(x|z_1), p(z_N) (`prior`), q(z_N|.) (`posterior`),
    the importance-weighted likelihood over all levels jointly, and sampling.

    Subclasses define forward, log_weights, reconstruct, posterior_means and p_z(i, z_above)
    -> p(z_i | z_{i+1}).
    """

    def __init__(
        self,
        latent_dims: list[int],
        data_shape: tuple[int, ...],
        net: object,
        prior: Prior,
        likelihood: Likelihood,
    ) -> None:
        super().__init__()
        self.latent_dims = latent_dims
        self.latent_dim = latent_dims[-1]  # the top level's, which prior and posterior see
        self.levels = len(latent_dims)
        self.names = level_names(self.levels)
        self.data_shape = tuple(data_shape)
        self.hidden_dim: int = net.hidden_dim
        self.prior = prior
        self.likelihood = likelihood
        self.decoder = net.bn_decoder(latent_dims[0], self.data_shape, likelihood.num_params)

    def bind(self, posterior: Posterior, top_posterior_of: Callable[[Tensor], Distribution]) -> None:
        """Refuse a mismatched prior/posterior pair; hand the prior its x -> q(z_N|x) map."""
        check_pairing(self.prior, posterior)
        self.prior.bind_posterior(top_posterior_of)

    def p_x(self, z1: Tensor) -> Distribution:
        """p(x|z_1) for z_1 (M, L_1): batch (M,), event = data shape."""
        return self.likelihood(run_net(self.decoder, z1))

    def p_z(self, i: int, z_above: Tensor) -> Distribution:  # pragma: no cover - interface
        """p(z_i | z_{i+1}) for 0-based level i < N-1: batch (M,), event (L_i,)."""
        raise NotImplementedError

    def weight_terms(self, x: Tensor, k: int) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover
        """For k joint draws from q: log p(x|z_1) (k, B) and, per level name, log q(z_i|.) -
        log p(z_i|.) (k, B); see `models.log_weights_of`."""
        raise NotImplementedError

    def log_weights(self, x: Tensor, k: int) -> Tensor:
        """log p(x, z_1..z_N) - log q(z_1..z_N | x) for k joint samples: (k, B)."""
        return log_weights_of(*self.weight_terms(x, k))

    def _log_p_x(self, x: Tensor, z1: Tensor, k: int) -> Tensor:
        """log p(x|z_1) for z_1 (k * B, L_1) sampled for x (B, *shape): (k, B)."""
        x_rep = x.expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])
        return self.p_x(z1).log_prob(x_rep).view(k, -1)

    @torch.no_grad()
    def sample(self, n: int, draw: bool = False) -> Tensor:
        """Ancestral sampling down the generative path; mean of p(x|z_1) (a draw with `draw`):
        (n, *shape)."""
        z = self.prior().sample((n,))  # (n, L_N)
        for i in reversed(range(self.levels - 1)):
            z = self.p_z(i, z).sample()
        return shown(self.p_x(z), draw)

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, k: int) -> Tensor:
        """Importance-weighted estimate of log p(x) over all levels jointly (Burda et al., 2016),
        shape (B,); chunked like VAE.log_likelihood (see models.iw_log_likelihood)."""
        return iw_log_likelihood(self.log_weights, x, k, decoder_outputs(self))


class TwoLevelVAE(HierarchicalVAE):
    """Two-level VAE with a bottom-up posterior (Tomczak, Deep Generative Modeling, 5.5.2.1):

        p(x, z1, z2) = p(x|z1) p(z1|z2) p(z2),   q(z1, z2|x) = q(z1|x) q(z2|z1)

    -ELBO = E_q[-log p(x|z1)] + E_q[log q(z1|x) - log p(z1|z2)] + E_q(z1|x) KL(q(z2|z1) || p(z2)).
    kl/z1 = -H[q(z1|x)] - log p(z1|z2) (entropy in closed form, one sample of z1, z2);
    kl/z2 through `kl_term`. Prone to collapse (Tomczak, 5.5.2.1; Burda et al., 2016): q(z2|z1)
    = p(z2) costs nothing once p(z1|z2) alone fits the aggregate posterior of z1. It is here to
    be compared, not fixed: watch kl/z2 and the active units of z2.
    p(z1|z2) and q(z2|z1) are diagonal Gaussians from `net.bn_vector_net`; q(z2|z1) is the
    `posterior` group on top of z1 features.
    """

    def __init__(
        self,
        latent_dims: Sequence[int],
        data_shape: tuple[int, ...],
        net: object,
        prior: Prior,
        make_posterior: Callable[..., Posterior],
        likelihood: Likelihood,
        latent_dim: int | None = None,
        conditional: bool = False,
        num_classes: int = 0,
    ) -> None:
        check_unconditional(conditional, "twolevel")
        sizes = check_sizes(latent_dims, 2, latent_dim)
        super().__init__(sizes, data_shape, net, prior, likelihood)
        l1, l2 = sizes
        self.encoder = net.bn_encoder(self.data_shape)  # x -> h (B, H)
        self.q_z1_head = nn.Linear(self.hidden_dim, 2 * l1)
        self.z1_features = net.bn_vector_net(l1)  # z1 -> (B, H), the input of q(z2|z1)
        self.posterior = make_posterior(hidden_dim=self.hidden_dim)
        self.p_z1_net = net.bn_vector_net(l2, 2 * l1)
        self.bind(self.posterior, self.q_z2_of_x)

    def q_z1(self, x: Tensor) -> Distribution:
        """q(z1|x): batch (B,), event (L1,)."""
        return diagonal_normal(*split_gaussian_params(self.q_z1_head(run_net(self.encoder, x))))

    def q_z2(self, z1: Tensor) -> Distribution:
        """q(z2|z1) for z1 (M, L1): batch (M,), event (L2,)."""
        return self.posterior(self.z1_features(z1))

    def q_z2_of_x(self, x: Tensor) -> Distribution:
        """x -> q(z2 | z1 = E_q[z1|x]): the top posterior as a function of x (for VampPrior)."""
        return self.q_z2(self.q_z1(x).mean)

    def p_z(self, i: int, z_above: Tensor) -> Distribution:
        """p(z1|z2) for z2 (M, L2): batch (M,), event (L1,)."""
        return diagonal_normal(*split_gaussian_params(self.p_z1_net(z_above)))

    def forward(self, x: Tensor, beta: float = 1.0, free_bits: float = 0.0) -> ELBO:
        """x (B, *shape) -> ELBO of per-example terms (B,), levels "z1", "z2"."""
        q_z1 = self.q_z1(x)
        z1 = q_z1.rsample()  # (B, L1)
        q_z2 = self.q_z2(z1)
        z2 = q_z2.rsample()  # (B, L2)
        kl_z1 = -q_z1.entropy() - self.p_z(0, z2).log_prob(z1)
        kl_z2 = kl_term(q_z2, self.prior(), z2)
        rec = -self.p_x(z1).log_prob(x)
        return make_elbo(rec, {"z1": kl_z1, "z2": kl_z2}, beta, free_bits)

    def weight_terms(self, x: Tensor, k: int) -> tuple[Tensor, dict[str, Tensor]]:
        """log p(x|z1) and {z1: log q(z1|x) - log p(z1|z2), z2: log q(z2|z1) - log p(z2)},
        each (k, B), for k joint draws from q."""
        q_z1 = self.q_z1(x)
        z1 = q_z1.rsample((k,))  # (k, B, L1)
        z1_flat = z1.reshape(-1, z1.shape[-1])  # (k * B, L1)
        q_z2 = self.q_z2(z1_flat)
        z2 = q_z2.rsample()  # (k * B, L2)
        term_z1 = q_z1.log_prob(z1) - self.p_z(0, z2).log_prob(z1_flat).view(k, -1)
        term_z2 = (q_z2.log_prob(z2) - self.prior().log_prob(z2)).view(k, -1)
        return self._log_p_x(x, z1_flat, k), {"z1": term_z1, "z2": term_z2}

    @torch.no_grad()
    def reconstruct(self, x: Tensor, draw: bool = False) -> Tensor:
        """Mean of p(x|z1) (a draw with `draw`) at z1 = E_q[z1|x]: (B, *shape)."""
        return shown(self.p_x(self.q_z1(x).mean), draw)

    @torch.no_grad()
    def posterior_means(self, x: Tensor) -> dict[str, Tensor]:
        """E_q[z1|x] (B, L1) exactly; E_q[z2|x] = E_q(z1|x) E_q[z2|z1] (B, L2) averaged over
        MC_MEAN_SAMPLES draws of z1 (Rao-Blackwellised: the inner mean is q(z2|z1)'s own)."""
        q_z1 = self.q_z1(x)
        z1 = q_z1.sample((MC_MEAN_SAMPLES,))  # (S, B, L1)
        mean_z2 = mean_of(self.q_z2(z1.reshape(-1, z1.shape[-1])))
        return {"z1": q_z1.mean, "z2": mean_z2.view(MC_MEAN_SAMPLES, x.shape[0], -1).mean(0)}


class TopDownVAE(HierarchicalVAE):
    """Top-down hierarchical VAE with N levels (Ladder VAE, Sonderby et al., 2016; NVAE's
    relative posterior, Vahdat & Kautz, 2020; Tomczak, Deep Generative Modeling, 5.5.2.2).

    Bottom-up (deterministic): r_1 = f_1(x) (the net's encoder), r_i = r_{i-1} + g_i(r_{i-1}).
    Generative, top-down:      z_N ~ p(z_N) (prior), [mu_i, log s_i^2] = NN_i(z_{i+1}), x ~ p(x|z_1).
    Posterior, same path:      q(z_N|x) = posterior(r_N);
                               q(z_i|z_{i+1}, x) = N(mu_i + dmu_i, s_i^2 ds_i^2),
                               [dmu_i, log ds_i^2] = NN_di(r_i)     (relative, as in NVAE)

    KL_i = 1/2 sum(dmu_i^2 / s_i^2 + ds_i^2 - log ds_i^2 - 1) in closed form for i < N (at the
    sampled z_{i+1}); KL_N = `kl_term(q(z_N|x), p(z_N))`, analytic or Monte Carlo. When the prior
    moves, the posterior moves with it, which keeps the levels from collapsing.
    """

    def __init__(
        self,
        levels: int,
        latent_dims: Sequence[int],
        data_shape: tuple[int, ...],
        net: object,
        prior: Prior,
        make_posterior: Callable[..., Posterior],
        likelihood: Likelihood,
        latent_dim: int | None = None,
        conditional: bool = False,
        num_classes: int = 0,
    ) -> None:
        check_unconditional(conditional, "topdown")
        sizes = check_sizes(latent_dims, levels, latent_dim)
        super().__init__(sizes, data_shape, net, prior, likelihood)
        hidden = self.hidden_dim
        blocks: list[nn.Module] = [net.bn_encoder(self.data_shape)]  # f_1: x -> r_1 (B, H)
        blocks += [Residual(net.bn_vector_net(hidden, hidden)) for _ in sizes[1:]]  # f_2 .. f_N
        self.bottom_up = nn.ModuleList(blocks)
        self.posterior = make_posterior(hidden_dim=hidden)  # q(z_N | r_N)
        # NN_i(z_{i+1}) and NN_di(r_i) for the lower levels i = 1..N-1 (index 0..N-2)
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.top_down = nn.ModuleList(net.bn_vector_net(above, 2 * size) for size, above in pairs)
        self.deltas = nn.ModuleList(net.bn_vector_net(hidden, 2 * size) for size in sizes[:-1])
        self.bind(self.posterior, self.q_top)

    def deterministic_path(self, x: Tensor) -> list[Tensor]:
        """[r_1, ..., r_N], each (B, H)."""
        r = [run_net(self.bottom_up[0], x)]
        for block in self.bottom_up[1:]:
            r.append(block(r[-1]))
        return r

    def q_top(self, x: Tensor) -> Distribution:
        """q(z_N|x): batch (B,), event (L_N,)."""
        return self.posterior(self.deterministic_path(x)[-1])

    def p_z(self, i: int, z_above: Tensor) -> Distribution:
        """p(z_i | z_{i+1}) for 0-based level i < N-1, z_above (M, L_{i+1}): batch (M,)."""
        return diagonal_normal(*split_gaussian_params(self.top_down[i](z_above)))

    def _step(self, i: int, z_above: Tensor, r_i: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Level i's prior and relative posterior parameters: mu, log s^2, dmu, log ds^2 (M, L_i)."""
        mu, log_var = split_gaussian_params(self.top_down[i](z_above))
        delta_mu, delta_log_var = split_gaussian_params(self.deltas[i](r_i))
        return mu, log_var, delta_mu, delta_log_var

    def forward(self, x: Tensor, beta: float = 1.0, free_bits: float = 0.0) -> ELBO:
        """x (B, *shape) -> ELBO of per-example terms (B,), levels "z1" ... "zN"."""
        r = self.deterministic_path(x)
        q_top = self.posterior(r[-1])
        z = q_top.rsample()  # (B, L_N)
        kls = {self.names[-1]: kl_term(q_top, self.prior(), z)}
        for i in reversed(range(self.levels - 1)):
            mu, log_var, delta_mu, delta_log_var = self._step(i, z, r[i])
            eps = standard_normal(mu.shape, 0, mu.dtype, mu.device)  # split like the batch (vaekit.shards)
            z = mu + delta_mu + torch.exp(0.5 * (log_var + delta_log_var)) * eps
            kls[self.names[i]] = relative_gaussian_kl(delta_mu, log_var, delta_log_var)
        rec = -self.p_x(z).log_prob(x)
        return make_elbo(rec, {name: kls[name] for name in self.names}, beta, free_bits)

    def weight_terms(self, x: Tensor, k: int) -> tuple[Tensor, dict[str, Tensor]]:
        """log p(x|z_1) and, per level, log q(z_i|z_{i+1}, x) - log p(z_i|z_{i+1}) (top: against
        the prior), each (k, B), for k joint draws down the top-down path."""
        r = self.deterministic_path(x)
        q_top = self.posterior(r[-1])
        z_top = q_top.rsample((k,))  # (k, B, L_N)
        terms = {self.names[-1]: q_top.log_prob(z_top) - self.prior().log_prob(z_top)}  # (k, B)
        z = z_top.reshape(-1, z_top.shape[-1])  # (k * B, L_N), sample-major like r_rep
        for i in reversed(range(self.levels - 1)):
            r_rep = r[i].expand(k, *r[i].shape).reshape(-1, r[i].shape[-1])  # (k * B, H)
            mu, log_var, delta_mu, delta_log_var = self._step(i, z, r_rep)
            q_i = diagonal_normal(mu + delta_mu, log_var + delta_log_var)
            z = q_i.rsample()
            terms[self.names[i]] = (q_i.log_prob(z) - diagonal_normal(mu, log_var).log_prob(z)).view(k, -1)
        return self._log_p_x(x, z, k), {name: terms[name] for name in self.names}

    @torch.no_grad()
    def reconstruct(self, x: Tensor, draw: bool = False) -> Tensor:
        """Mean of p(x|z_1) with posterior means plugged in down the path: z_N = E_q[z_N|x],
        z_i = mu_i(z_{i+1}) + dmu_i: (B, *shape)."""
        r = self.deterministic_path(x)
        z = mean_of(self.posterior(r[-1]))
        for i in reversed(range(self.levels - 1)):
            mu, _, delta_mu, _ = self._step(i, z, r[i])
            z = mu + delta_mu
        return shown(self.p_x(z), draw)

    @torch.no_grad()
    def posterior_means(self, x: Tensor) -> dict[str, Tensor]:
        """E_q[z_i|x] per level, (B, L_i). Top: E_q[z_N|x]. Below: E_q[z_i|x] = dmu_i +
        E_q[mu_i(z_{i+1})], the outer expectation over MC_MEAN_SAMPLES joint samples of the levels
        above (Rao-Blackwellised: level i's own noise is integrated out exactly)."""
        r = self.deterministic_path(x)
        q_top = self.posterior(r[-1])
        means = {self.names[-1]: mean_of(q_top)}
        z = q_top.sample((MC_MEAN_SAMPLES,)).reshape(-1, self.latent_dim)  # (S * B, L_N)
        for i in reversed(range(self.levels - 1)):
            r_rep = r[i].expand(MC_MEAN_SAMPLES, *r[i].shape).reshape(-1, r[i].shape[-1])
            mu, log_var, delta_mu, delta_log_var = self._step(i, z, r_rep)
            conditional_mean = mu + delta_mu  # E_q[z_i | z_{i+1}, x], (S * B, L_i)
            means[self.names[i]] = conditional_mean.view(MC_MEAN_SAMPLES, x.shape[0], -1).mean(0)
            z = conditional_mean + torch.exp(0.5 * (log_var + delta_log_var)) * torch.randn_like(mu)
        return {name: means[name] for name in self.names}
