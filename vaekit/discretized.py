"""Discretized logistic likelihoods for images with `num_levels` intensity levels (8-bit: 256).

Data x in [0, 1] take the values k / (L - 1), k = 0..L-1. Both distributions work in the
[-1, 1] units of PixelCNN++: y = 2x - 1, level centres c_k = -1 + 2k / (L - 1), bin half-width
hw = 1 / (L - 1). A logistic(mu, s) with CDF sigma((y - mu) / s) is discretized by integrating
it over each bin; the edge bins take the tails:

    P(k) = sigma((c_k + hw - mu) / s) - sigma((c_k - hw - mu) / s)     0 < k < L - 1
    P(0) = sigma((c_0 + hw - mu) / s)                 P(L - 1) = 1 - sigma((c_{L-1} - hw - mu) / s)

- Kingma et al., 2016, "Improved Variational Inference with Inverse Autoregressive Flow"
  (the discretized logistic).
- Salimans et al., 2017, "PixelCNN++" (mixtures, the RGB channel coefficients, the stable form).
- Vahdat & Kautz, 2020, "NVAE" (the mixture as a VAE decoder's likelihood).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Categorical, Distribution, constraints

LOG_SCALE_MIN = -7.0  # log_scale is clamped from below here (s >= 9e-4 in [-1, 1] units)
# Below this bin width in standard units (2 hw / s) the bin's log-probability is taken as the
# log-density at its centre times its width (PixelCNN++'s fallback; exact to O(width^2) there).
MIDPOINT_WIDTH = 1e-5
_TINY = 1e-30  # floor inside a log, so that the unused branch of a where() keeps finite gradients
_UNIFORM_EPS = 1e-6  # uniform draws are kept in [eps, 1 - eps] before the logistic's inverse CDF
_MEAN_CHUNK_ELEMENTS = 2**24  # at most this many sigmoids at once in the expected value
_NO_SAMPLE_DIMS = torch.Size()


def level_index(x: Tensor, num_levels: int) -> Tensor:
    """Nearest level k = round(x (L - 1)) in 0..L-1 of data x in [0, 1] (same shape, x's dtype)."""
    return (x * (num_levels - 1)).round().clamp(0, num_levels - 1)


def level_centre(k: Tensor, num_levels: int) -> Tensor:
    """Centre c_k = -1 + 2k / (L - 1) in [-1, 1] units of level k."""
    return 2.0 * k / (num_levels - 1) - 1.0


def log_bin_probs(k: Tensor, loc: Tensor, log_scale: Tensor, num_levels: int) -> Tensor:
    """Elementwise log P(k) of the discretized logistic(loc, exp(log_scale)) in [-1, 1] units.

    k: levels (floats holding integers 0..L-1), broadcast against loc and log_scale; the result
    has the broadcast shape. log_scale must already be clamped. Middle bins use the stable form

        log(sigma(a) - sigma(b)) = -softplus(-a) - softplus(b) + log(1 - exp(-(a - b))),

    a = (c_k + hw - mu) / s, b = (c_k - hw - mu) / s, with a - b = 2 hw / s computed directly;
    edge bins use log sigma(a) = -softplus(-a) and log(1 - sigma(b)) = -softplus(b). Where
    2 hw / s < MIDPOINT_WIDTH: log f((c_k - mu) / s) - log s + log(2 hw), f the logistic density.
    """
    half_width = 1.0 / (num_levels - 1)
    inv_scale = torch.exp(-log_scale)
    centred = level_centre(k, num_levels) - loc
    upper = inv_scale * (centred + half_width)  # a
    lower = inv_scale * (centred - half_width)  # b
    log_cdf_upper = -F.softplus(-upper)  # log sigma(a): the lowest bin
    log_sf_lower = -F.softplus(lower)  # log(1 - sigma(b)): the top bin
    width = (2.0 * half_width) * inv_scale  # a - b > 0
    log_middle = log_cdf_upper + log_sf_lower + torch.log(torch.clamp(-torch.expm1(-width), min=_TINY))
    u = inv_scale * centred
    log_midpoint = -u - 2.0 * F.softplus(-u) - log_scale + math.log(2.0 * half_width)
    log_middle = torch.where(width > MIDPOINT_WIDTH, log_middle, log_midpoint)
    return torch.where(k < 0.5, log_cdf_upper, torch.where(k > num_levels - 1.5, log_sf_lower, log_middle))


def expected_value(loc: Tensor, log_scale: Tensor, num_levels: int) -> Tensor:
    """E[x] in [0, 1] of the discretized logistic, elementwise (broadcast shape of the inputs).

    By the tail sum, E[k] = sum_{j=1}^{L-1} P(k >= j) = sum_j sigma((mu - c_j + hw) / s), and
    E[x] = E[k] / (L - 1); the L - 1 sigmoids are summed in chunks to bound memory.
    """
    loc, log_scale = torch.broadcast_tensors(loc, log_scale)
    inv_scale = torch.exp(-log_scale)
    boundaries = level_centre(torch.arange(1, num_levels, device=loc.device, dtype=loc.dtype), num_levels)
    boundaries = boundaries - 1.0 / (num_levels - 1)  # lower edges of levels 1..L-1
    chunk = max(1, _MEAN_CHUNK_ELEMENTS // max(1, loc.numel()))
    total = torch.zeros_like(loc)
    for start in range(0, num_levels - 1, chunk):
        edges = boundaries[start : start + chunk].view(-1, *([1] * loc.dim()))
        total = total + torch.sigmoid((loc - edges) * inv_scale).sum(0)
    return total / (num_levels - 1)


def sample_level(loc: Tensor, log_scale: Tensor, num_levels: int) -> Tensor:
    """One level k (float) per element: a logistic draw mu + s log(u / (1 - u)) rounded to the
    nearest level and clamped to 0..L-1, which is an exact draw from the discretized pmf."""
    u = torch.rand_like(loc).clamp_(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)
    y = loc + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
    return ((y + 1.0) * ((num_levels - 1) / 2.0)).round().clamp(0, num_levels - 1)


def _check_levels(num_levels: int) -> None:
    if num_levels < 2:
        raise ValueError(f"num_levels must be at least 2, not {num_levels}.")


class DiscretizedLogistic(Distribution):
    """Independent discretized logistics over L levels {0, 1/(L-1), ..., 1} per subpixel.

    loc, log_scale: (*batch, *event), in [-1, 1] units (see the module docstring for the pmf);
    log_scale is clamped from below at LOG_SCALE_MIN. log_prob sums over the event, in nats.
    Kingma et al., 2016 (IAF); the stable log-space form of Salimans et al., 2017 (PixelCNN++).
    """

    arg_constraints = {"loc": constraints.real, "log_scale": constraints.real}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(
        self, loc: Tensor, log_scale: Tensor, num_levels: int, event_dims: int, validate_args: bool = False
    ) -> None:
        _check_levels(num_levels)
        loc, log_scale = torch.broadcast_tensors(loc, log_scale)
        self.loc = loc
        self.log_scale = log_scale.clamp(min=LOG_SCALE_MIN)
        self.num_levels = num_levels
        shape = loc.shape
        split = len(shape) - event_dims
        super().__init__(shape[:split], shape[split:], validate_args=validate_args)

    def _sum_event(self, value: Tensor) -> Tensor:
        return value.flatten(-len(self.event_shape)).sum(-1) if self.event_shape else value

    def log_prob(self, value: Tensor) -> Tensor:
        """(*sample, *batch) log-probability in nats of x in [0, 1] (snapped to the level grid)."""
        k = level_index(value, self.num_levels)
        return self._sum_event(log_bin_probs(k, self.loc, self.log_scale, self.num_levels))

    @property
    def mean(self) -> Tensor:
        """The exact expected value E[x] in [0, 1] (not the clamped loc), (*batch, *event)."""
        return expected_value(self.loc, self.log_scale, self.num_levels)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = _NO_SAMPLE_DIMS) -> Tensor:
        """Levels in [0, 1] on the grid k / (L - 1), shape (*sample_shape, *batch, *event)."""
        shape = self._extended_shape(torch.Size(sample_shape))
        loc, log_scale = self.loc.expand(shape), self.log_scale.expand(shape)
        return sample_level(loc, log_scale, self.num_levels) / (self.num_levels - 1)


class DiscretizedMixtureLogistic(Distribution):
    """Discretized mixture of K logistics per pixel, channels autoregressive for RGB.

    params: (*batch, C, *spatial, P), one vector of P = num_params(K, C) per SUBPIXEL (the layout
    of vaekit's decoders, `nets.ChannelsLast`); event_shape = (C, *spatial), `event_dims` long.
    Channel c's slots hold blocks of K: [0:K] mixture logits, [K:2K] locs mu_{c,k} (in [-1, 1]
    units), [2K:3K] log-scales (clamped at LOG_SCALE_MIN) and, for C = 3 only, [3K:4K] raw
    coefficients. The mixture logits are read from channel 0's slots only; alpha = tanh(channel
    0's coefficients), beta = tanh(channel 1's), gamma = tanh(channel 2's). Unused slots (the
    logits of channels 1, 2) get no gradient. So P = 3K for C = 1 and 4K for C = 3. With y the
    data in [-1, 1] and pi = softmax(logits), per pixel

        p(x) = sum_k pi_k  DL(y_R; mu_R,k, s_R,k)  DL(y_G; mu_G,k + alpha_k y_R, s_G,k)
                           DL(y_B; mu_B,k + beta_k y_R + gamma_k y_G, s_B,k)

    (C = 1: p(x) = sum_k pi_k DL(y; mu_k, s_k)), DL the discretized logistic pmf of
    DiscretizedLogistic, summed in log space (logsumexp). Salimans et al., 2017 (PixelCNN++);
    Vahdat & Kautz, 2020 (NVAE).
    """

    arg_constraints = {"params": constraints.real}
    support = constraints.unit_interval
    has_rsample = False

    @staticmethod
    def num_params(num_mixtures: int, channels: int) -> int:
        """Decoder outputs per subpixel: 3K for grayscale, 4K for RGB."""
        return (3 if channels == 1 else 4) * num_mixtures

    def __init__(
        self,
        params: Tensor,
        num_mixtures: int,
        num_levels: int,
        channels: int,
        event_dims: int = 3,
        validate_args: bool = False,
    ) -> None:
        _check_levels(num_levels)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {channels}.")
        if num_mixtures < 1:
            raise ValueError(f"num_mixtures must be at least 1, not {num_mixtures}.")
        expected = self.num_params(num_mixtures, channels)
        self._channel_dim = -(event_dims + 1)  # in params and in per-component tensors
        if params.dim() < event_dims + 1 or params.shape[self._channel_dim] != channels:
            shape = tuple(params.shape)
            raise ValueError(f"params {shape} do not have {channels} channels at dim {self._channel_dim}.")
        if params.shape[-1] != expected:
            raise ValueError(f"params hold {params.shape[-1]} values per subpixel, not {expected}.")
        K, cd = num_mixtures, self._channel_dim
        self.params = params
        self.num_mixtures, self.num_levels, self.channels = num_mixtures, num_levels, channels
        self.logits = params.select(cd, 0)[..., :K]  # (*batch, *spatial, K)
        self.locs = params[..., K : 2 * K]  # (*batch, C, *spatial, K)
        self.log_scales = params[..., 2 * K : 3 * K].clamp(min=LOG_SCALE_MIN)
        self.coeffs = torch.tanh(params[..., 3 * K : 4 * K]) if channels == 3 else None  # alpha, beta, gamma
        shape = params.shape[:-1]
        split = len(shape) - event_dims
        super().__init__(shape[:split], shape[split:], validate_args=validate_args)

    def _component_locs(self, y: Tensor) -> Tensor:
        """Means mu_{c,k} shifted by the earlier channels' values y (…, C, *spatial, 1) in [-1, 1]:
        (…, C, *spatial, K)."""
        if self.coeffs is None:
            return self.locs
        cd = self._channel_dim
        coeff = self.coeffs
        y_r, y_g = y.select(cd, 0), y.select(cd, 1)
        loc_g = self.locs.select(cd, 1) + coeff.select(cd, 0) * y_r
        loc_b = self.locs.select(cd, 2) + coeff.select(cd, 1) * y_r + coeff.select(cd, 2) * y_g
        loc_r = self.locs.select(cd, 0).expand_as(loc_b)
        return torch.stack([loc_r, loc_g, loc_b], dim=cd)

    def log_prob(self, value: Tensor) -> Tensor:
        """(*sample, *batch) log-probability in nats of x in [0, 1] (snapped to the level grid)."""
        k = level_index(value, self.num_levels).unsqueeze(-1)  # (…, C, *spatial, 1)
        locs = self._component_locs(level_centre(k, self.num_levels))
        log_bins = log_bin_probs(k, locs, self.log_scales, self.num_levels)  # (…, C, *spatial, K)
        log_mix = log_bins.sum(self._channel_dim) + torch.log_softmax(self.logits, dim=-1)
        log_pixel = torch.logsumexp(log_mix, dim=-1)  # (…, *spatial)
        spatial = len(self.event_shape) - 1
        return log_pixel.flatten(-spatial).sum(-1) if spatial else log_pixel

    @property
    def mean(self) -> Tensor:
        """Expected value in [0, 1], (*batch, C, *spatial): sum_k pi_k E_k[x_c].

        Exact for C = 1 and for the R channel. For G and B, E_k[x_G] plugs the component's
        expected E_k[y_R] (not the whole law of y_R) into mu_G,k + alpha_k y_R (likewise for B),
        so it is exact when the coefficients are zero and a close approximation otherwise.
        """
        cd = self._channel_dim
        if self.coeffs is None:
            means = expected_value(self.locs, self.log_scales, self.num_levels)
        else:
            coeff, locs, log_scales = self.coeffs, self.locs, self.log_scales
            mean_r = expected_value(locs.select(cd, 0), log_scales.select(cd, 0), self.num_levels)
            y_r = 2.0 * mean_r - 1.0
            mean_g = expected_value(
                locs.select(cd, 1) + coeff.select(cd, 0) * y_r, log_scales.select(cd, 1), self.num_levels
            )
            y_g = 2.0 * mean_g - 1.0
            loc_b = locs.select(cd, 2) + coeff.select(cd, 1) * y_r + coeff.select(cd, 2) * y_g
            mean_b = expected_value(loc_b, log_scales.select(cd, 2), self.num_levels)
            means = torch.stack([mean_r, mean_g, mean_b], dim=cd)
        weights = torch.softmax(self.logits, dim=-1).unsqueeze(cd)  # (*batch, 1, *spatial, K)
        return (means * weights).sum(-1).clamp(0.0, 1.0)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = _NO_SAMPLE_DIMS) -> Tensor:
        """Levels in [0, 1] on the grid, shape (*sample_shape, *batch, C, *spatial): a component
        per pixel, then R, G, B in order, each shifted by the coefficients times the sampled
        (discretized) earlier channels."""
        cd = self._channel_dim
        sample_shape = torch.Size(sample_shape)
        component = Categorical(logits=self.logits).sample(sample_shape)  # (*S, *batch, *spatial)
        full = sample_shape + self.params.shape[:-1] + (self.num_mixtures,)  # (*S, *batch, C, *spatial, K)
        index = component.unsqueeze(cd + 1).unsqueeze(-1).expand(*full[:-1], 1)

        def pick(t: Tensor) -> Tensor:
            return t.expand(full).gather(-1, index).squeeze(-1)  # (*S, *batch, C, *spatial)

        loc, log_scale = pick(self.locs), pick(self.log_scales)
        if self.coeffs is None:
            return sample_level(loc, log_scale, self.num_levels) / (self.num_levels - 1)
        coeff, L = pick(self.coeffs), self.num_levels
        k_r = sample_level(loc.select(cd + 1, 0), log_scale.select(cd + 1, 0), L)
        y_r = level_centre(k_r, L)
        loc_g = loc.select(cd + 1, 1) + coeff.select(cd + 1, 0) * y_r
        k_g = sample_level(loc_g, log_scale.select(cd + 1, 1), L)
        y_g = level_centre(k_g, L)
        loc_b = loc.select(cd + 1, 2) + coeff.select(cd + 1, 1) * y_r + coeff.select(cd + 1, 2) * y_g
        k_b = sample_level(loc_b, log_scale.select(cd + 1, 2), L)
        return torch.stack([k_r, k_g, k_b], dim=cd + 1) / (L - 1)
