"""p(x|z) families. A decoder outputs `params` of shape (B, *data_shape, num_params);
a likelihood turns them into a Distribution whose event_shape is the data shape.

Data reach every likelihood as floats in [0, 1] (binary for Bernoulli).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent, Normal, constraints

from vaekit.discretized import DiscretizedLogistic, DiscretizedMixtureLogistic
from vaekit.errors import VaekitError

_NO_SAMPLE_DIMS = torch.Size()


def broadcast_shape(a: Sequence[int], b: Sequence[int]) -> torch.Size:
    """The broadcast of two shapes (`expand` refuses a mismatch). torch.broadcast_shapes would
    do, but its first call imports sympy, about 1 s of start-up."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return torch.Size(y if x == 1 else x for x, y in zip(a, b, strict=True))


def bernoulli_log_density(logits: Tensor, value: Tensor) -> Tensor:
    """log Bernoulli(value | sigmoid(logits)) elementwise, shapes broadcast:

        x l - softplus(l) = (x l - relu(l)) + log sigmoid(|l|)

    torch's softplus and BCE go through log1p, which is not vectorised on the CPU (about 10 ns
    per element); sigmoid then log are (this is about 3x faster). For binary x the first part
    is exact (l - l or 0 - 0), so confident pixels lose nothing to cancellation, and
    sigmoid(|l|) lies in [1/2, 1), so the log is within ~1e-7 of exact at every logit.
    The gradient is BCE's, x - sigmoid(l) (`_BernoulliLogDensity`).
    """
    return _BernoulliLogDensity.apply(logits, value)


# Elements per block of `_log_density_values`: its intermediates (three of them) then stay in a
# core's cache; whole large tensors made the five passes memory-bound (scripts/bench_iw.py).
BLOCK_ELEMENTS = 2**17


def _log_density_values(logits: Tensor, value: Tensor) -> Tensor:
    """(x l - relu(l)) + log sigmoid(|l|), block by block (`_blocks`) for large inputs."""
    value = value.expand_as(logits) if value.shape != logits.shape else value
    if logits.numel() <= BLOCK_ELEMENTS:
        return _block_values(logits, value)
    out = torch.empty_like(logits)
    for l_block, x_block, o_block in _blocks(logits, value, out):
        torch.addcmul(torch.relu(l_block).neg_(), x_block, l_block, out=o_block)
        o_block.add_(l_block.abs().sigmoid_().log_())
    return out


def _block_values(logits: Tensor, value: Tensor) -> Tensor:
    log_sig = logits.abs().sigmoid_().log_()
    return torch.addcmul(torch.relu(logits).neg_(), value, logits).add_(log_sig)


def _blocks(*tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """Matching views of same-shape tensors, each of at most BLOCK_ELEMENTS elements where the
    shape allows: slices along the first dimension, or rows of it taken one at a time."""
    first = tensors[0]
    if first.numel() <= BLOCK_ELEMENTS or first.dim() <= 1:
        yield tensors
        return
    row = first[0].numel()
    if row <= BLOCK_ELEMENTS:
        yield from zip(*(t.split(BLOCK_ELEMENTS // row) for t in tensors), strict=True)
        return
    for index in range(first.shape[0]):
        yield from _blocks(*(t[index] for t in tensors))


class _BernoulliLogDensity(torch.autograd.Function):
    """Forward `_log_density_values`; backward d/dl = x - sigmoid(l), d/dx = l (summed back to
    each input's shape where it was broadcast)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: Tensor, value: Tensor) -> Tensor:
        ctx.save_for_backward(logits, value)
        return _log_density_values(logits, value)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        logits, value = ctx.saved_tensors
        grad_logits = grad_value = None
        if ctx.needs_input_grad[0]:
            grad_logits = (grad * (value - torch.sigmoid(logits))).sum_to_size(logits.shape)
        if ctx.needs_input_grad[1]:
            grad_value = (grad * logits).sum_to_size(value.shape)
        return grad_logits, grad_value


class FastBernoulli(Bernoulli):
    """torch's Bernoulli(logits=...) with `bernoulli_log_density` as its log_prob (about 3x
    faster on the CPU, the same value to ~1e-7 and the same gradient)."""

    def log_prob(self, value: Tensor) -> Tensor:
        """Elementwise log-probability, the broadcast shape of logits and value."""
        return bernoulli_log_density(self.logits, value)


class QuantizedCategorical(Distribution):
    """Independent categoricals over K evenly spaced levels {0, 1/(K-1), ..., 1} per dimension.

    logits: (*batch, *event, K). log p(x) = sum_d [logits_d[k_d] - logsumexp(logits_d)] with
    k_d = round(x_d (K - 1)), in float32 with no one-hot table.
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, logits: Tensor, event_dims: int, validate_args: bool = False) -> None:
        self.logits = logits
        self.num_vals = logits.shape[-1]
        shape = logits.shape[:-1]
        split = len(shape) - event_dims
        super().__init__(shape[:split], shape[split:], validate_args=validate_args)

    def _sum_event(self, value: Tensor) -> Tensor:
        return value.flatten(-len(self.event_shape)).sum(-1) if self.event_shape else value

    def log_prob(self, value: Tensor) -> Tensor:
        """(*batch,) log-probability in nats."""
        shape = broadcast_shape(value.shape, self.logits.shape[:-1])
        index = (value * (self.num_vals - 1)).round_().long().expand(shape).unsqueeze(-1)
        logits = self.logits.expand(*shape, self.num_vals)
        # log-softmax then pick: as fast as cross_entropy in training, about 2x faster on the
        # large batches of the importance-weighted estimate (scripts/bench_iw.py)
        return self._sum_event(logits.log_softmax(-1).gather(-1, index).squeeze(-1))

    @property
    def probs(self) -> Tensor:
        """(*batch, *event, K) level probabilities."""
        return torch.softmax(self.logits, dim=-1)

    @property
    def mean(self) -> Tensor:
        """Expected level in [0, 1], shape (*batch, *event)."""
        levels = torch.linspace(0, 1, self.num_vals, device=self.logits.device, dtype=self.logits.dtype)
        return self.probs @ levels

    def sample(self, sample_shape: torch.Size = _NO_SAMPLE_DIMS) -> Tensor:
        """Levels in [0, 1], shape (*sample_shape, *batch, *event)."""
        flat = self.probs.reshape(-1, self.num_vals)
        index = torch.multinomial(flat, math.prod(sample_shape) or 1, replacement=True)
        index = index.T.reshape(*sample_shape, *self.logits.shape[:-1])
        return index.float() / (self.num_vals - 1)


class Likelihood(nn.Module):
    """Base class: `num_params` decoder outputs per data dimension -> Distribution over x."""

    num_params: int = 1
    binary_data: bool = False  # True: the data must be binarized (Bernoulli)
    discrete: bool = True  # False: a density on the pixel values, whose NLL is not a code length

    def forward(self, params: Tensor) -> Distribution:  # pragma: no cover - interface
        raise NotImplementedError

    def check_dataset(self, num_levels: int, shape: Sequence[int] = ()) -> None:
        """Raise VaekitError when this likelihood cannot model a dataset of `num_levels`
        intensity levels and examples of `shape` (C, H, W)."""


class BernoulliLikelihood(Likelihood):
    """x_d ~ Bernoulli(sigmoid(logit_d)) on binarized data; log_prob is `bernoulli_log_density`."""

    num_params = 1
    binary_data = True

    def forward(self, params: Tensor) -> Distribution:
        logits = params.squeeze(-1)  # (B, *shape)
        return Independent(FastBernoulli(logits=logits, validate_args=False), logits.dim() - 1)


class CategoricalLikelihood(Likelihood):
    """x_d one of `num_vals` levels; see QuantizedCategorical."""

    def __init__(self, num_vals: int) -> None:
        super().__init__()
        if num_vals < 2:
            raise VaekitError(f"likelihood.num_vals must be at least 2, not {num_vals}.")
        self.num_params = num_vals

    def check_dataset(self, num_levels: int, shape: Sequence[int] = ()) -> None:
        if (num_levels - 1) % (self.num_params - 1) != 0:
            raise VaekitError(
                f"likelihood.num_vals={self.num_params} does not divide the dataset's "
                f"{num_levels} levels evenly: choose a num_vals with (num_vals - 1) dividing "
                f"{num_levels - 1}, e.g. {num_levels}."
            )

    def forward(self, params: Tensor) -> Distribution:
        return QuantizedCategorical(params, event_dims=params.dim() - 2)


class GaussianLikelihood(Likelihood):
    """x_d ~ N(mu_d, sigma_d^2); sigma_d = min_std + softplus(.) when learned, else fixed `std`."""

    discrete = False

    def __init__(self, learn_std: bool = True, std: float = 0.1, min_std: float = 0.01) -> None:
        super().__init__()
        if std <= 0 or min_std <= 0:
            raise VaekitError("likelihood.std and likelihood.min_std must be positive.")
        self.learn_std = learn_std
        self.std = std
        self.min_std = min_std
        self.num_params = 2 if learn_std else 1

    def forward(self, params: Tensor) -> Distribution:
        mean = params[..., 0]
        if self.learn_std:
            scale = self.min_std + F.softplus(params[..., 1])
        else:
            scale = torch.full_like(mean, self.std)
        return Independent(Normal(mean, scale, validate_args=False), mean.dim() - 1)


class _DiscretizedLikelihood(Likelihood):
    """Shared checks of the discretized logistic likelihoods: the data's levels must be theirs."""

    option = ""  # the likelihood=... name that error messages give

    def __init__(self, num_levels: int) -> None:
        super().__init__()
        if num_levels < 2:
            raise VaekitError(f"likelihood.num_levels must be at least 2, not {num_levels}.")
        self.num_levels = num_levels

    def check_dataset(self, num_levels: int, shape: Sequence[int] = ()) -> None:
        if num_levels == 2:
            raise VaekitError(f"likelihood={self.option} on binarized data: use likelihood=bernoulli.")
        if num_levels != self.num_levels:
            raise VaekitError(
                f"likelihood.num_levels={self.num_levels} but the dataset has {num_levels} levels: "
                f"set likelihood.num_levels={num_levels} (its default follows dataset.num_levels)."
            )


class DiscretizedLogisticLikelihood(_DiscretizedLikelihood):
    """x_d ~ discretized logistic over num_levels levels; params (B, *shape, 2) = [loc, log_scale]
    per subpixel, loc in [-1, 1] units. See vaekit.discretized.DiscretizedLogistic."""

    num_params = 2
    option = "dlogistic"

    def forward(self, params: Tensor) -> Distribution:
        return DiscretizedLogistic(params[..., 0], params[..., 1], self.num_levels, params.dim() - 2)


class DiscretizedMixtureLikelihood(_DiscretizedLikelihood):
    """Discretized mixture of num_mixtures logistics per pixel (PixelCNN++ / NVAE), RGB channels
    autoregressive; params (B, C, H, W, 3K) for C = 1, (B, C, H, W, 4K) for C = 3, laid out as
    vaekit.discretized.DiscretizedMixtureLogistic documents."""

    option = "dmol"

    def __init__(self, num_levels: int, channels: int, num_mixtures: int = 10) -> None:
        super().__init__(num_levels)
        if channels not in (1, 3):
            raise VaekitError(
                f"likelihood.channels={channels}: dmol models grayscale (1) or RGB (3) images only."
            )
        if num_mixtures < 1:
            raise VaekitError(f"likelihood.num_mixtures must be at least 1, not {num_mixtures}.")
        self.channels = channels
        self.num_mixtures = num_mixtures
        self.num_params = DiscretizedMixtureLogistic.num_params(num_mixtures, channels)

    def check_dataset(self, num_levels: int, shape: Sequence[int] = ()) -> None:
        super().check_dataset(num_levels, shape)
        if shape and shape[0] != self.channels:
            raise VaekitError(
                f"likelihood.channels={self.channels} but the data have {shape[0]} channels: "
                f"set likelihood.channels={shape[0]} (its default follows dataset.shape)."
            )

    def forward(self, params: Tensor) -> Distribution:
        if params.shape[1] != self.channels:
            raise VaekitError(
                f"likelihood.channels={self.channels} but the data have {params.shape[1]} channels: "
                f"set likelihood.channels={params.shape[1]} (its default follows dataset.shape)."
            )
        event_dims = params.dim() - 2
        return DiscretizedMixtureLogistic(
            params, self.num_mixtures, self.num_levels, self.channels, event_dims=event_dims
        )
