"""The latent space of a trained model: posterior means per level, and paths between codes."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from vaekit.data import batches
from vaekit.errors import VaekitError

MC_MEAN_SAMPLES = 64  # samples that estimate E_q[z] when q has no closed-form mean


def mean_of(q: Distribution, num_samples: int = MC_MEAN_SAMPLES) -> Tensor:
    """E_q[z] of q with batch (B,) and event (L,): (B, L); Monte Carlo when q has no `mean`."""
    try:
        return q.mean
    except NotImplementedError:  # flow posteriors: average reparameterised samples
        return q.sample((num_samples,)).mean(0)


def require_one_level(model: nn.Module, what: str) -> None:
    """Refuse, in one sentence, a model without the one-level q_z(x) / p_x(z) interface."""
    if not (hasattr(model, "q_z") and hasattr(model, "p_x")):
        raise VaekitError(
            f"{what} works on one-level models (model=vae) only; this run's model is {type(model).__name__}."
        )


@torch.no_grad()
def posterior_means(
    model: nn.Module, x: Tensor, batch_size: int, y: Tensor | None = None
) -> dict[str, Tensor]:
    """Posterior means E_q[z|x] of every latent level over x (N, *shape): level -> (N, L_level).

    A model with several levels may offer `posterior_means(x) -> {level: (B, L)}`; the
    one-level VAE gives {"z": q_z(x).mean}. `y` (N,): the labels of x, for a conditional model
    (E_q[z|x, y]), batched alongside x.
    """
    per_level: dict[str, list[Tensor]] = {}
    label_batches = batches(y, batch_size) if y is not None else None
    for xb in batches(x, batch_size):
        labels = {} if label_batches is None else {"y": next(label_batches)}  # xb's labels
        if hasattr(model, "posterior_means"):
            means = model.posterior_means(xb, **labels)
        else:
            require_one_level(model, "Reading the posterior means")
            means = {"z": mean_of(model.q_z(xb, **labels))}
        for level, mean in means.items():
            per_level.setdefault(level, []).append(mean)
    return {level: torch.cat(parts) for level, parts in per_level.items()}


def lerp(a: Tensor, b: Tensor, steps: int) -> Tensor:
    """Points on the segment from a (L,) to b (L,), both ends included: (steps, L)."""
    t = torch.linspace(0, 1, steps, device=a.device, dtype=a.dtype)[:, None]
    return (1 - t) * a + t * b


def slerp(a: Tensor, b: Tensor, steps: int) -> Tensor:
    """Points on the great circle from a/|a| to b/|b| on the unit sphere: (steps, L).

    slerp(t) = [sin((1-t) w) a + sin(t w) b] / sin w, w the angle between a and b
    (Shoemake, 1985); falls back to the normalised segment when a and b (anti)align.
    """
    a, b = a / a.norm(), b / b.norm()
    omega = torch.arccos((a * b).sum().clamp(-1, 1))
    if omega.abs() < 1e-4 or (torch.pi - omega).abs() < 1e-4:
        path = lerp(a, b, steps)
        return path / path.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    t = torch.linspace(0, 1, steps, device=a.device, dtype=a.dtype)[:, None]
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
