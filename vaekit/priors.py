"""p(z): the distribution of the (top) latent. Every prior's forward() returns a
torch Distribution with event_shape (L,)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    Normal,
    TransformedDistribution,
)

from vaekit.errors import VaekitError
from vaekit.flows.realnvp import real_nvp
from vaekit.rng import own_rng


class Prior(nn.Module):
    """Base class of priors over z in R^L (or on a manifold, see `on_sphere`)."""

    on_sphere: bool = False  # True for priors supported on the unit sphere S^{L-1}

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if latent_dim < 1:
            raise VaekitError(f"model.latent_dim must be at least 1, not {latent_dim}.")
        self.latent_dim = latent_dim

    def forward(self) -> Distribution:  # pragma: no cover - interface
        raise NotImplementedError

    def bind_posterior(self, posterior_of: Callable[[Tensor], Distribution]) -> None:
        """Called once by the model with its x -> q(z|x) map (the top latent's posterior).

        Priors built from the posterior (VampPrior) keep it; the others ignore it. The map
        is a bound method of the model, so the encoder is shared, never copied.
        """

    def initialize_from_data(self, x_train: Tensor) -> None:
        """Called once before training with the training split (N, *shape) in [0, 1] on the
        device; priors that start from data (VampPrior with init=data) use it."""


class StandardPrior(Prior):
    """p(z) = N(0, I_L)."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> Distribution:
        return Independent(Normal(self.loc, self.scale, validate_args=False), 1)


# Upper bound on the (points, K, L) elements one chunk of a mixture's log_prob builds
# (2**24 float32 = 64 MiB), so importance-weighted evaluation with many samples stays bounded.
MIXTURE_CHUNK_ELEMENTS = 2**24


def diagonal_normal_log_density(z: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """log N(z_n; loc_k, diag(scale_k^2)) for every pair (n, k): z (N, L), loc and scale (K, L) -> (N, K).

    The quadratic form sum_l (z_l - loc_kl)^2 / scale_kl^2 is expanded into two matrix
    products, so no (N, K, L) tensor is built; it is computed in float64 (float32 on MPS,
    which lacks it) because the expansion subtracts large, nearly equal terms.
    """
    dtype = z.dtype
    exact = torch.float32 if z.device.type == "mps" else torch.float64
    z, loc, scale = z.to(exact), loc.to(exact), scale.to(exact)
    inv_var = scale.pow(-2)  # (K, L)
    quad = (z * z) @ inv_var.T - 2 * z @ (loc * inv_var).T + (loc * loc * inv_var).sum(-1)  # (N, K)
    log_norm = scale.log().sum(-1) + 0.5 * z.shape[-1] * math.log(2 * math.pi)  # (K,)
    return (-0.5 * quad.clamp(min=0) - log_norm).to(dtype)


class ChunkedMixture(MixtureSameFamily):
    """MixtureSameFamily with batch_shape () whose log_prob bounds its memory.

    log p(z) = logsumexp_k [log softmax(w)_k + log p_k(z)] for z (*batch, L). Diagonal Gaussian
    components go through `diagonal_normal_log_density` (matrix products); other families are
    evaluated on chunks of points, at most MIXTURE_CHUNK_ELEMENTS (point, component, dimension)
    triples at once, whatever the number of points (e.g. k * B in the IW estimate).
    """

    def log_prob(self, value: Tensor) -> Tensor:
        """(*batch,) log-density of value (*batch, L)."""
        num_components = self._num_component
        log_w = torch.log_softmax(self.mixture_distribution.logits, dim=-1)  # (K,)
        points = value.reshape(-1, *self.event_shape)  # (N, L)
        chunk = max(1, MIXTURE_CHUNK_ELEMENTS // (num_components * max(1, self.event_shape.numel())))
        parts = [torch.logsumexp(self._component_log_prob(z) + log_w, dim=-1) for z in points.split(chunk)]
        return torch.cat(parts).view(value.shape[: value.dim() - len(self.event_shape)])

    def _component_log_prob(self, z: Tensor) -> Tensor:
        """(n, K) log-density of each point z (n, L) under each component."""
        components = self.component_distribution
        base = getattr(components, "base_dist", None)
        if type(components) is Independent and isinstance(base, Normal) and len(self.event_shape) == 1:
            shape = (self._num_component, *self.event_shape)  # (K, L)
            return diagonal_normal_log_density(z, base.loc.expand(shape), base.scale.expand(shape))
        return components.log_prob(z.unsqueeze(-1 - len(self.event_shape)))  # (n, 1, L) -> (n, K)


class MixtureOfGaussiansPrior(Prior):
    """Learnable mixture of K diagonal Gaussians over the whole latent vector:

        p(z) = sum_k pi_k N(z; mu_k, diag(exp(log_var_k))),   pi = softmax(logits)
        log p(z) = logsumexp_k [log pi_k + log N(z; mu_k, diag(exp(log_var_k)))]

    Each component is a joint Gaussian on R^L (not a product of per-dimension mixtures).
    Means start at N(0, init_scale^2) draws, standard deviations at init_std, weights equal.
    Keep init_std near 1 for large L: a narrow component is far (in KL, linearly in L) from the
    unit-variance posteriors of unused latent dimensions, which then cost nats until it widens.
    Parameters: means, log_vars (K, L), logits (K,).
    """

    def __init__(
        self, latent_dim: int, num_components: int = 16, init_scale: float = 1.0, init_std: float = 1.0
    ) -> None:
        super().__init__(latent_dim)
        if num_components < 1:
            raise VaekitError(f"prior.num_components must be at least 1, not {num_components}.")
        if not init_scale > 0:  # equal means would stay equal: every component gets the same gradient
            raise VaekitError(f"prior.init_scale must be positive, not {init_scale}.")
        self.num_components = num_components
        with own_rng():
            self.means = nn.Parameter(init_scale * torch.randn(num_components, latent_dim))
        if not init_std > 0:
            raise VaekitError(f"prior.init_std must be positive, not {init_std}.")
        self.log_vars = nn.Parameter(torch.full((num_components, latent_dim), 2 * math.log(init_std)))
        self.logits = nn.Parameter(torch.zeros(num_components))

    def forward(self) -> Distribution:
        """Batch (), event (L,); log_prob on any (*batch, L)."""
        components = Independent(Normal(self.means, torch.exp(0.5 * self.log_vars), validate_args=False), 1)
        mixing = Categorical(logits=self.logits, validate_args=False)
        return ChunkedMixture(mixing, components, validate_args=False)


class VampPrior(Prior):
    """VampPrior (Tomczak & Welling, 2018): the aggregated posterior of K pseudo-inputs,

        p(z) = 1/K sum_k q(z | u_k),   u_k = sigmoid(a_k) in [0, 1]^shape

    The pseudo-inputs live in data space, kept in the data's range [0, 1] by a sigmoid of
    unconstrained parameters a (K, *shape). q is the model's own posterior (bound by the model
    through `bind_posterior`; the encoder is shared, not copied). `init="data"` starts the
    u_k at K training examples (`initialize_from_data`), `init="random"` at uniform noise.
    """

    # Data values are clipped into [EPS, 1 - EPS] before the logit, so pseudo-inputs that
    # start at a black or white pixel keep a usable sigmoid gradient.
    EPS = 0.02

    def __init__(
        self, latent_dim: int, shape: tuple[int, ...], num_components: int = 500, init: str = "data"
    ) -> None:
        super().__init__(latent_dim)
        if num_components < 1:
            raise VaekitError(f"prior.num_components must be at least 1, not {num_components}.")
        if init not in ("random", "data"):
            raise VaekitError(f"prior.init must be random or data, not {init}.")
        self.shape = tuple(int(d) for d in shape)
        self.num_components = num_components
        self.init = init
        with own_rng():
            u = torch.rand(num_components, *self.shape).clamp(self.EPS, 1 - self.EPS)
        self.pseudo_logits = nn.Parameter(torch.logit(u))  # (K, *shape)
        # uniform weights 1/K: a constant, so not saved in checkpoints
        self.register_buffer("mixing_logits", torch.zeros(num_components), persistent=False)
        # A bound method of the model, kept as a plain attribute: it is not an nn.Module, so
        # the encoder is neither copied nor registered twice in the state dict.
        self._posterior_of: Callable[[Tensor], Distribution] | None = None

    def bind_posterior(self, posterior_of: Callable[[Tensor], Distribution]) -> None:
        """Keep the model's x -> q(z|x) map; p(z) is built from it at every call."""
        self._posterior_of = posterior_of

    @torch.no_grad()
    def initialize_from_data(self, x_train: Tensor) -> None:
        """With init=data, start the pseudo-inputs at K random training examples (N, *shape)."""
        if tuple(x_train.shape[1:]) != self.shape:
            raise VaekitError(
                f"prior.shape={list(self.shape)} does not match the data's shape {list(x_train.shape[1:])}."
            )
        if self.init != "data":
            return
        n = x_train.shape[0]
        with own_rng():  # drawn from the CPU stream: the same examples on every device
            if self.num_components <= n:
                index = torch.randperm(n)[: self.num_components]
            else:  # more pseudo-inputs than examples: draw with replacement
                index = torch.randint(n, (self.num_components,))
        u = x_train[index.to(x_train.device)].clamp(self.EPS, 1 - self.EPS)
        self.pseudo_logits.copy_(torch.logit(u).to(self.pseudo_logits))

    def pseudo_inputs(self) -> Tensor:
        """u (K, *shape) in [0, 1]."""
        return torch.sigmoid(self.pseudo_logits)

    def forward(self) -> Distribution:
        """Batch (), event (L,): an equal-weight mixture of the K posteriors q(z | u_k)."""
        if self._posterior_of is None:
            raise VaekitError("prior=vampprior needs a model that binds its posterior (bind_posterior).")
        components = self._posterior_of(self.pseudo_inputs())  # batch (K,), event (L,)
        mixing = Categorical(logits=self.mixing_logits, validate_args=False)
        return ChunkedMixture(mixing, components, validate_args=False)


class FlowPrior(Prior):
    """RealNVP prior (Dinh et al., 2017): z = f(e), e ~ N(0, I_L), f = f_F o ... o f_1 a stack
    of `num_flows` affine couplings with alternating masks (vaekit.flows.realnvp).

        log p(z) = log N(f^{-1}(z); 0, I) - sum_i log|det J_{f_i}(e_{i-1})|

    Sampling runs the forward map; log_prob runs the exact inverse (any (*batch, L)).
    Each coupling starts as the identity, so the untrained prior is N(0, I).
    """

    def __init__(self, latent_dim: int, num_flows: int = 4, hidden_dim: int = 256) -> None:
        super().__init__(latent_dim)
        with own_rng():
            self.flows = real_nvp(latent_dim, num_flows, hidden_dim)
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> Distribution:
        """Batch (), event (L,)."""
        base = Independent(Normal(self.loc, self.scale, validate_args=False), 1)
        return TransformedDistribution(base, list(self.flows), validate_args=False)


class UniformSpherePrior(Prior):
    """p(z) = U(S^{L-1}) = 1 / |S^{L-1}|, the uniform distribution on the unit sphere
    (Davidson et al., 2018); pairs with posterior=vmf or power_spherical (analytic KL)."""

    on_sphere = True

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        if latent_dim < 2:
            raise VaekitError(f"prior=uniform_sphere needs model.latent_dim of at least 2, not {latent_dim}.")
        # carries the device and dtype of .to(...) into forward(); not saved in checkpoints
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    def forward(self) -> Distribution:
        """Batch (), event (L,)."""
        from vaekit.spherical import HypersphericalUniform  # here: this block stays self-contained

        anchor = self.anchor
        return HypersphericalUniform(self.latent_dim, anchor.device, anchor.dtype, validate_args=False)
