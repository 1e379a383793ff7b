"""Evaluation metrics: NELBO and its terms, importance-weighted NLL, bits/dim, active units,
and `evaluate_model`, which computes them all for one split."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vaekit.data import batches
from vaekit.errors import VaekitError
from vaekit.latents import posterior_means


@torch.no_grad()
def nelbo_terms(model: nn.Module, x: Tensor, batch_size: int, samples: int = 1) -> dict[str, float]:
    """Mean per-example NELBO, rec and KL (total and per level, `kl/<level>`) over x, nats.

    Each example's terms are averaged over `samples` independent draws z ~ q(z|x): the
    single-draw estimate is unbiased but noisy, and that noise shrinks as 1/sqrt(samples)
    (README's results section gives its size on digits).
    """
    totals: dict[str, Tensor] = {}
    for _ in range(samples):
        for xb in batches(x, batch_size):
            elbo = model(xb)
            terms = {"nelbo": elbo.nelbo, "rec": elbo.rec, "kl": elbo.kl}
            terms.update({f"kl/{name}": kl for name, kl in elbo.kl_per_level.items()})
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.sum()
    stacked = torch.stack(list(totals.values())).div_(x.shape[0] * samples).tolist()  # one host sync
    return dict(zip(totals.keys(), stacked, strict=True))


K_CHUNK = 100  # importance samples per model.log_likelihood call: the progress bar's step
# Most (example, z) pairs one evaluation may take: IW-NLL with k = 5000 on 10,000 MNIST test
# images is 5e7; 1e10 is hours of decoder calls even on a GPU.
MAX_EVALUATIONS = 10**10


def check_budget(num_examples: int, draws: int, option: str) -> None:
    """Refuse, with the estimate, an evaluation of more than MAX_EVALUATIONS (x, z) pairs."""
    total = num_examples * draws
    if total > MAX_EVALUATIONS:
        raise VaekitError(
            f"{option}={draws} would evaluate the model on {num_examples} x {draws} = {total:.2g} "
            f"(x, z) pairs, more than the {MAX_EVALUATIONS:.0e} that vaekit runs in one evaluation: "
            f"lower {option}."
        )


@torch.no_grad()
def iw_nll(model: nn.Module, x: Tensor, k: int, batch_size: int, progress: bool = True) -> float:
    """Mean importance-weighted negative log-likelihood with k samples, nats per example.

    -log p(x) <= NELBO in expectation for every k >= 1 and approaches -log p(x) as k grows
    (Burda et al., 2016). Examples go in batches and samples in chunks of K_CHUNK; chunks
    combine exactly, log p(x) ~= logsumexp_c [ll_c + log k_c] - log k, where ll_c is the
    model's k_c-sample estimate (`log_likelihood(x, k_c)`, itself chunked so memory stays
    bounded). The progress bar shows on a terminal only.
    """
    check_budget(x.shape[0], k, "k")
    total = torch.zeros((), device=x.device, dtype=torch.float64)
    bar = tqdm(
        total=x.shape[0] * k,
        desc=f"IW-NLL (k={k})",
        unit="sample",
        unit_scale=True,
        disable=None if progress else True,  # None: shown on a terminal only
        leave=False,
    )
    with bar:
        for xb in batches(x, batch_size):
            log_sum = None  # running logsumexp over the chunks: memory stays one (B,) tensor
            for start in range(0, k, K_CHUNK):
                size = min(K_CHUNK, k - start)
                part = model.log_likelihood(xb, size).double() + math.log(size)  # (B,)
                log_sum = part if log_sum is None else torch.logaddexp(log_sum, part)
                bar.update(xb.shape[0] * size)
            total += (log_sum - math.log(k)).sum()
    return -total.item() / x.shape[0]


def bits_per_dim(nll_nats: float, num_dims: int) -> float:
    """Negative log-likelihood per example in nats -> bits per data dimension."""
    return nll_nats / (num_dims * math.log(2))


def active_units(means: Tensor | Mapping[str, Tensor], threshold: float = 0.01) -> dict[str, int]:
    """Number of active latent units per level (Burda et al., 2016, section 5.2).

    Unit u is active when A_u = Cov_x(E_{q(z|x)}[z_u]) > threshold: its posterior mean moves
    with the input; an inactive unit's posterior is the same for every x (collapsed).
    means: level -> (N, L_level) posterior means of N examples (N >= 2); a single tensor
    (N, L) counts as the one level "z". Returns level -> count of active units.
    """
    per_level = {"z": means} if isinstance(means, Tensor) else dict(means)
    counts: dict[str, int] = {}
    for level, mean in per_level.items():
        if mean.dim() != 2 or mean.shape[0] < 2:
            raise ValueError(f"active_units needs (N >= 2, L) means per level, got {tuple(mean.shape)}.")
        variance = mean.double().var(dim=0)  # (L,) covariance over x of each unit's mean
        counts[level] = int((variance > threshold).sum())
    return counts


def evaluate_model(
    model: nn.Module,
    x: Tensor,
    iw_samples: int,
    nelbo_samples: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Every metric of `model` (eval mode) on one split x (N, *shape), and the posterior means.

    Returns ({nelbo, rec, kl, kl_<level>, iw_nll, bpd, nelbo_bpd, active_units: {level: n},
    latent_dims: {level: L}}, {level: (N, L) posterior means}). Each stage is seeded with
    `seed` on its own, so the same seed gives the same numbers, and changing k leaves the
    NELBO unchanged: `vaekit evaluate` and the end of `vaekit train` agree.
    """
    model.eval()
    num_dims = math.prod(x.shape[1:])
    torch.manual_seed(seed)
    terms = nelbo_terms(model, x, batch_size, nelbo_samples)
    torch.manual_seed(seed)
    nll = iw_nll(model, x, iw_samples, batch_size, progress)
    torch.manual_seed(seed)
    means = posterior_means(model, x, batch_size)
    metrics: dict[str, Any] = {name.replace("/", "_"): value for name, value in terms.items()}
    metrics.update(
        iw_nll=nll,
        bpd=bits_per_dim(nll, num_dims),
        nelbo_bpd=bits_per_dim(terms["nelbo"], num_dims),
        active_units=active_units(means),
        latent_dims={level: int(mean.shape[1]) for level, mean in means.items()},
    )
    return metrics, means
