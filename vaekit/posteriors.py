"""q(z|x): a head on the encoder's features h (B, H) that returns a Distribution with
batch_shape (B,) and event_shape (L,), reparameterised (rsample)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from vaekit.errors import VaekitError


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
        return Independent(Normal(mu, torch.exp(0.5 * log_var), validate_args=False), 1)
