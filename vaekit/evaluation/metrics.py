"""Evaluation metrics: the validation NELBO and its terms, bits/dim, active units, and
`evaluate_model`, which computes every test metric of one split (the IW-NLL and the test
NELBO in one pass, `vaekit.evaluation.importance`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vaekit.data import batches
from vaekit.errors import VaekitError
from vaekit.evaluation.importance import importance_estimates
from vaekit.latents import posterior_means
from vaekit.shards import Shard, split_noise


@torch.inference_mode()
def nelbo_terms(
    model: nn.Module, x: Tensor, batch_size: int, shard: Shard | None = None, y: Tensor | None = None
) -> dict[str, float]:
    """Mean per-example NELBO, rec and KL (total and per level, `kl/<level>`) over x, nats:
    one draw z ~ q(z|x) per example and the KL as training computes it (analytic where it
    exists). The validation signal; the test NELBO comes from `importance_estimates`. `y` (N,):
    the labels of x, for a conditional model (its NELBO then bounds -log p(x|y)).

    With `shard` (one of several processes, each holding all of x), every batch is split over
    the processes: this one scores its rows with their part of the whole batch's noise
    (`vaekit.shards.split_noise`) and the sums are added up over processes (`shard.reduce`), so
    each returns the numbers one process would."""
    totals: dict[str, Tensor] = {}
    label_batches = batches(y, batch_size) if y is not None else None
    for xb in batches(x, batch_size):
        rows = shard.rows(xb.shape[0]) if shard is not None else None
        labels = {} if label_batches is None else {"y": next(label_batches)}  # xb's labels
        if labels and rows is not None:
            labels["y"] = labels["y"][rows]
        with split_noise(xb.shape[0], rows):
            elbo = model(xb if rows is None else xb[rows], **labels)
        terms = {"nelbo": elbo.nelbo, "rec": elbo.rec, "kl": elbo.kl}
        terms.update({f"kl/{name}": kl for name, kl in elbo.kl_per_level.items()})
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + value.sum()
    stacked = torch.stack(list(totals.values()))
    if shard is not None:
        stacked = shard.reduce(stacked)
    stacked = stacked.div_(x.shape[0]).tolist()  # one host sync
    return dict(zip(totals.keys(), stacked, strict=True))


# Most (example, z) pairs one evaluation may take: IW-NLL with k = 5000 on 10,000 MNIST test
# images is 5e7; 1e10 is hours of decoder calls even on a GPU.
MAX_EVALUATIONS = 10**10


def check_budget(num_examples: int, draws: int | None, option: str) -> None:
    """Refuse, with the estimate, an evaluation of more than MAX_EVALUATIONS (x, z) pairs."""
    total = num_examples * (draws or 0)
    if total > MAX_EVALUATIONS:
        raise VaekitError(
            f"{option}={draws} would evaluate the model on {num_examples} x {draws} = {total:.2g} "
            f"(x, z) pairs, more than the {MAX_EVALUATIONS:.0e} that vaekit runs in one evaluation: "
            f"lower {option}."
        )


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
    nelbo_samples: int | None,
    batch_size: int,
    seed: int,
    progress: bool = True,
    chunk_elements: int | None = None,
    shard: Shard | None = None,
    y: Tensor | None = None,
    ais_chains: int = 100,
    ais_betas: int = 10000,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Every metric of `model` (eval mode) on one split x (N, *shape), and the posterior means.

    Returns ({nelbo, rec, kl, kl_<level>, iw_nll, bpd, nelbo_bpd, active_units: {level: n},
    latent_dims: {level: L}}, {level: (N, L) posterior means}). The IW-NLL (iw_samples draws)
    and the NELBO with its terms (the first nelbo_samples of those draws; None: all of them)
    come from one pass (`importance_estimates`). Each stage is seeded with `seed` on its own,
    so the same seed gives the same numbers: `vaekit evaluate` and the end of `vaekit train`
    agree. batch_size: examples per pass of the posterior means. With `shard` (one of several
    processes) the importance pass is shared out (`importance_estimates`), each process seeded
    with `shard.seed(seed)`; the posterior means are computed whole in every process. `y` (N,):
    the labels of x, for a conditional model (its NELBO and IW-NLL are then of log p(x|y)).
    A model=rbm is scored by `rbm_metrics` instead (AIS with ais_chains and ais_betas), a model=ebm
    by `ebm_metrics`.
    """
    model.eval()
    num_dims = math.prod(x.shape[1:])
    if getattr(model, "trained_by", None) == "cd":  # model=rbm: AIS, not importance weights
        return rbm_metrics(model, x, ais_chains, ais_betas, batch_size, seed, progress)
    if getattr(model, "trained_by", None) == "contrastive":  # model=ebm: AIS as well
        return ebm_metrics(model, x, ais_chains, ais_betas, batch_size, seed, progress)
    torch.manual_seed(seed if shard is None else shard.seed(seed))
    estimates = importance_estimates(model, x, iw_samples, nelbo_samples, chunk_elements, progress, shard, y)
    torch.manual_seed(seed)
    means = posterior_means(model, x, batch_size, y)
    nll = estimates["iw_nll"]
    metrics: dict[str, Any] = {name.replace("/", "_"): v for name, v in estimates.items() if name != "iw_nll"}
    metrics.update(
        iw_nll=nll,
        bpd=bits_per_dim(nll, num_dims),
        nelbo_bpd=bits_per_dim(estimates["nelbo"], num_dims),
        active_units=active_units(means),
        latent_dims={level: int(mean.shape[1]) for level, mean in means.items()},
    )
    return metrics, means


def rbm_metrics(
    model: nn.Module,
    x: Tensor,
    ais_chains: int,
    ais_betas: int,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The test metrics of a model=rbm on x, seeded with `seed`: the AIS estimate of the NLL in the
    key the VAEs' IW-NLL uses (`iw_nll`, with `estimator` "ais" beside it), its standard error,
    log Z with its own, bits/dim, and the hidden units' probabilities as the "posterior means"."""
    from vaekit.evaluation.ais import rbm_estimates

    torch.manual_seed(seed)
    estimates = rbm_estimates(model, x, ais_chains, ais_betas, batch_size, progress)
    torch.manual_seed(seed)
    means = posterior_means(model, x, batch_size)
    metrics = ais_record(estimates, x, ais_chains, ais_betas, estimates["free_energy"])
    metrics.update(
        active_units=active_units(means),
        latent_dims={level: int(mean.shape[1]) for level, mean in means.items()},
    )
    return metrics, means


def ais_record(
    estimates: dict[str, float], x: Tensor, ais_chains: int, ais_betas: int, mean_energy: float
) -> dict[str, Any]:
    """The metrics an AIS estimate gives (model=rbm, model=ebm): the NLL in the VAEs' `iw_nll` key
    with `estimator` "ais", its standard error, bits/dim, the AIS settings, log Z with its standard
    error, and the mean (free) energy of x."""
    nll = estimates["nll"]
    return {
        "iw_nll": nll,
        "iw_nll_stderr": estimates["nll_stderr"],
        "bpd": bits_per_dim(nll, math.prod(x.shape[1:])),
        "estimator": "ais",
        "ais_chains": ais_chains,
        "ais_betas": ais_betas,
        "log_z": estimates["log_z"],
        "log_z_stderr": estimates["log_z_stderr"],
        "free_energy": mean_energy,
    }


def ebm_metrics(
    model: nn.Module,
    x: Tensor,
    ais_chains: int,
    ais_betas: int,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The test metrics of a model=ebm on x, seeded with `seed`: the dequantized NLL bound with log Z
    by AIS (`vaekit.evaluation.ais.ebm_estimates`) in the VAEs' `iw_nll` key, `estimator` "ais"
    beside it, its standard error, log Z with its own, bits/dim, the mean energy (`free_energy`, the
    key model=rbm's mean free energy has). AIS's log Z is a
    stochastic lower bound, so the NLL is optimistic. No latent variables: no posterior means."""
    from vaekit.evaluation.ais import DEQUANTIZATION_DRAWS, ebm_estimates

    torch.manual_seed(seed)
    estimates = ebm_estimates(model, x, ais_chains, ais_betas, batch_size, progress=progress)
    # the mean E_u[E(y)]: an EBM's energy is its free energy
    metrics = ais_record(estimates, x, ais_chains, ais_betas, estimates["energy"])
    metrics.update(dequantization_draws=DEQUANTIZATION_DRAWS, active_units={}, latent_dims={})
    return metrics, {}
