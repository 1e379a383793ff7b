"""p(z): the distribution of the (top) latent. Every prior's forward() returns a
torch Distribution with event_shape (L,)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from vaekit.errors import VaekitError


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
