"""One importance-sampling pass that gives both test numbers of a split.

For each example x the pass draws z_1..z_D ~ q(z|x) and evaluates every model's
`weight_terms(x, D)`: log p(x|z_j) and, per latent level l, d_lj = log q(z_lj|.) - log p(z_lj|.).
With log w_j = log p(x|z_j) - sum_l d_lj (`models.log_weights_of`):

    IW-NLL(x) = -[logsumexp_{j<=k} log w_j - log k]     (Burda et al., 2016; k draws)
    NELBO(x)  = mean_{j<=n} -log w_j = rec + sum_l KL_l  (n draws; D = max(k, n))
    rec(x)    = mean_{j<=n} -log p(x|z_j),   KL_l(x) = mean_{j<=n} d_lj

so the NELBO with its terms costs nothing beyond the IW estimate (its KL is the Monte Carlo
one, an unbiased estimate of the analytic KL that training may use). Pairs (x, z) go to the
decoder in calls of about `chunk_elements` decoder outputs: examples per call when D draws
fit, else draws per call for one example; chunks combine exactly (running logsumexp in float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vaekit.models import decoder_outputs, log_weights_of
from vaekit.shards import Shard

# Decoder outputs per call: on the CPU a call whose output stays within the caches is about 2x
# faster per pair than one of 2**24 (scripts/bench_iw.py); accelerators want large calls.
CPU_CHUNK_ELEMENTS = 2**22
ACCELERATOR_CHUNK_ELEMENTS = 2**26


@dataclass(frozen=True)
class ChunkShape:
    """How the pass walks a split: `examples` per call, each with `draws` samples per call."""

    examples: int
    draws: int


def chunk_shape(draws: int, outputs_per_pair: int, chunk_elements: int) -> ChunkShape:
    """Examples and draws per decoder call so that one call holds about `chunk_elements`
    decoder outputs (at least one pair)."""
    pairs = max(1, chunk_elements // outputs_per_pair)
    if draws >= pairs:
        return ChunkShape(examples=1, draws=pairs)
    return ChunkShape(examples=pairs // draws, draws=draws)


def default_chunk_elements(device: torch.device) -> int:
    """CPU_CHUNK_ELEMENTS on the CPU, ACCELERATOR_CHUNK_ELEMENTS elsewhere."""
    return CPU_CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS


@torch.inference_mode()
def importance_estimates(
    model: nn.Module,
    x: Tensor,
    k: int,
    nelbo_draws: int | None = None,
    chunk_elements: int | None = None,
    progress: bool = True,
    shard: Shard | None = None,
    y: Tensor | None = None,
) -> dict[str, float]:
    """Mean per-example IW-NLL (k draws) and NELBO, rec, kl, kl/<level> (the first
    `nelbo_draws` draws; None: all k) of `model` (eval mode) on x (N, *shape), in nats.

    Returns {"iw_nll", "nelbo", "rec", "kl", "kl/<level>"...}. The progress bar shows on a
    terminal only. With `shard` (one of several processes, each holding all of x) this process
    takes its contiguous block of x (`shard.rows`), and the sums are added up over processes
    (`shard.reduce`) before the means over all N examples: the same estimator, each example's
    draws coming from the stream of the process that scores it. `y` (N,): the labels of x for a
    conditional model, split and sharded as x is (the estimates are then of log p(x|y)).
    """
    num_examples = x.shape[0]
    if shard is not None:
        x = x[shard.rows(num_examples)]
        y = None if y is None else y[shard.rows(num_examples)]
    n = k if nelbo_draws is None else nelbo_draws
    total_draws = max(k, n)
    elements = chunk_elements or default_chunk_elements(x.device)
    shape = chunk_shape(total_draws, decoder_outputs(model), elements)
    iw_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    term_sums: Tensor | None = None  # (1 + levels,) sums of -log p(x|z) and each level's term
    names: list[str] = []
    bar = tqdm(
        total=x.shape[0] * total_draws,
        desc=f"IW-NLL (k={k})",
        unit="sample",
        unit_scale=True,
        disable=None if progress else True,  # None: shown on a terminal only
        leave=False,
    )
    with bar:
        x_chunks = x.split(shape.examples)
        y_chunks = y.split(shape.examples) if y is not None else (None,) * len(x_chunks)
        for xb, yb in zip(x_chunks, y_chunks, strict=True):
            labels = {} if yb is None else {"y": yb}  # xb's labels, for a conditional model
            log_sum: Tensor | None = None  # running logsumexp over the draws, (B,) float64
            for start in range(0, total_draws, shape.draws):
                size = min(shape.draws, total_draws - start)
                log_p_x, levels = model.weight_terms(xb, size, **labels)
                names = list(levels)
                log_sum = _add_iw_draws(log_sum, log_weights_of(log_p_x, levels), k - start)
                kept = min(size, n - start)  # draws that count in the NELBO
                if kept > 0:
                    parts = torch.stack([-log_p_x[:kept], *(t[:kept] for t in levels.values())])
                    sums = parts.sum(dim=(1, 2), dtype=torch.float64)
                    term_sums = sums if term_sums is None else term_sums + sums
                bar.update(xb.shape[0] * size)
            iw_sum += (log_sum - math.log(k)).sum()
    sums = torch.cat([iw_sum.view(1), term_sums])  # (2 + levels,) in float64
    if shard is not None:
        sums = shard.reduce(sums)
    return _means(sums, names, num_examples, n)


def _add_iw_draws(log_sum: Tensor | None, log_w: Tensor, remaining: int) -> Tensor | None:
    """Fold the first `remaining` rows of log_w (draws, B) into the running logsumexp (B,)."""
    if remaining <= 0:
        return log_sum
    part = torch.logsumexp(log_w[:remaining].double(), dim=0)
    return part if log_sum is None else torch.logaddexp(log_sum, part)


def _means(sums: Tensor, names: list[str], num_examples: int, n: int) -> dict[str, float]:
    """Per-example means from the pass's sums [iw, rec, *levels] (the evaluation's one host sync)."""
    values = torch.cat([sums[:1] / num_examples, sums[1:] / (num_examples * n)]).tolist()
    iw_nll, rec, *kls = values
    result = {"iw_nll": -iw_nll, "nelbo": rec + sum(kls), "rec": rec, "kl": sum(kls)}
    result.update({f"kl/{name}": kl for name, kl in zip(names, kls, strict=True)})
    return result
