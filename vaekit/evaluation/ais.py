"""Annealed importance sampling (Neal, 2001) of an RBM's log partition function, and the test
NLL it gives (Salakhutdinov & Murray, 2008, "On the quantitative analysis of deep belief
networks").

The path runs from a base model A (visible biases b_A, no weights, h uniform) to the RBM B
through the geometric averages on the joint (v, h),

    p_k(v, h) ∝ exp(-(1 - beta_k) E_A(v) - beta_k E_B(v, h)),   beta_k = k / (K - 1), k = 0..K-1,

whose marginals p*_k(v) = exp(-F_{beta_k}(v)) are `rbm.free_energy(v, beta_k, b_A)`. Each chain
starts at v_1 ~ p_A, takes a Gibbs step that leaves p_k invariant after weighting at beta_k, and

    log w = sum_{k=1}^{K-1} [F_{beta_{k-1}}(v_k) - F_{beta_k}(v_k)],   Z_B / Z_A ~= mean_chains w.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution
from tqdm import tqdm

from vaekit.errors import VaekitError
from vaekit.evaluation.samplers import langevin
from vaekit.rbm import RBM


@dataclass(frozen=True)
class AISResult:
    """log Z estimate, its delta-method standard error, and the chains' log-weights (num_chains,)."""

    log_z: float
    stderr: float
    log_weights: Tensor


def base_rate_bias(v_train: Tensor, eps: float = 1e-3) -> Tensor:
    """The base-rate model's visible biases log(p / (1 - p)), p = the mean of each binary visible
    unit over the data clamped to [eps, 1 - eps] (Salakhutdinov & Murray, 2008):
    (N, D or *shape) -> (D,)."""
    p = v_train.reshape(v_train.shape[0], -1).float().mean(0).clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


def log_mean_exp_stderr(log_w: Tensor) -> tuple[float, float]:
    """log mean(w) and the delta-method standard error of it, std(w) / (mean(w) sqrt(n)), from
    log w (n,) without leaving log space for the large terms: with r = w / mean(w) (each <= n),
    std(w) / mean(w) = sqrt(n / (n - 1) (mean(r^2) - 1)). The stderr is nan for n = 1."""
    log_w = log_w.double()
    n = log_w.numel()
    log_mean = torch.logsumexp(log_w, 0) - math.log(n)
    if n < 2:
        return log_mean.item(), math.nan
    r = torch.exp(log_w - log_mean)
    relative_var = (n / (n - 1)) * (r.square().mean() - 1.0).clamp(min=0.0)
    return log_mean.item(), math.sqrt(relative_var.item() / n)


@torch.no_grad()
def ais_log_z(
    rbm: RBM, num_chains: int, num_betas: int, base_visible_bias: Tensor | None = None, progress: bool = False
) -> AISResult:
    """log Z of `rbm` by AIS with num_chains parallel chains and num_betas linearly spaced
    inverse temperatures (0 and 1 included): log Z = log Z_A + log mean w (see the module).

    base_visible_bias (D,): b_A; default the RBM's own visible biases (for binary data
    `base_rate_bias(v_train)` is the usual choice). A Gaussian RBM's base is N(b_A, sigma^2)
    with the RBM's sigma. Vectorised over chains; the log-weights accumulate in float64.
    """
    if num_chains < 1:
        raise VaekitError(f"AIS needs at least one chain, not {num_chains}.")
    if num_betas < 2:
        raise VaekitError(f"AIS needs at least 2 inverse temperatures (0 and 1), not {num_betas}.")
    if base_visible_bias is not None:
        base_visible_bias = base_visible_bias.to(rbm.visible_bias)
    betas = torch.linspace(0.0, 1.0, num_betas, dtype=torch.float64).tolist()
    hidden_zeros = rbm.weight.new_zeros(num_chains, rbm.hidden)
    v = rbm.sample_visible(hidden_zeros, 0.0, base_visible_bias)  # v_1 ~ p_A: the drive at beta 0 is b_A
    log_w = torch.zeros(num_chains, dtype=torch.float64, device=v.device)
    shown = None if progress else True  # None: a bar on a terminal only
    bar = tqdm(range(1, num_betas), desc="AIS log Z", unit="beta", leave=False, disable=shown)
    for k in bar:
        log_w += (rbm.free_energy(v, betas[k - 1], base_visible_bias)
                  - rbm.free_energy(v, betas[k], base_visible_bias)).double()
        if k < num_betas - 1:  # the last sample would only be used by a next weight
            v = rbm.gibbs_step(v, betas[k], base_visible_bias)
    log_mean_w, stderr = log_mean_exp_stderr(log_w)
    log_z_a = rbm.base_log_z(base_visible_bias).double().item()
    return AISResult(log_z=log_z_a + log_mean_w, stderr=stderr, log_weights=log_w)


@torch.no_grad()
def ais_nll(rbm: RBM, v_test: Tensor, result: AISResult, batch_size: int = 4096) -> tuple[float, float]:
    """Test NLL in nats and its standard error from an AIS estimate of log Z: v_test (N, D or *shape).

    nll = mean_n F(v_n) + log Z (-log p, a negative log-density for Gaussian visible units);
    its stderr combines the spread over examples, std_n F(v_n) / sqrt(N) (0 for N = 1), and
    the AIS stderr of log Z as independent errors: sqrt(std^2 / N + stderr_AIS^2).
    """
    free = torch.cat([rbm.free_energy(v).double() for v in v_test.split(batch_size)])  # (N,)
    n = free.numel()
    spread = free.std().item() / math.sqrt(n) if n > 1 else 0.0
    return free.mean().item() + result.log_z, math.sqrt(spread**2 + result.stderr**2)


@torch.no_grad()
def rbm_estimates(
    model: Any, x: Tensor, num_chains: int, num_betas: int, batch_size: int = 4096, progress: bool = False
) -> dict[str, float]:
    """Test numbers of a model=rbm (`vaekit.image_rbm.ImageRBM`) on images x (N, C, H, W), nats:

    {"nll", "nll_stderr", "log_z", "log_z_stderr", "free_energy"}, with nll = mean F(v) + log Z
    + model.nll_offset (the dequantized bound for Gaussian visible units, exact for binary ones)
    and log Z from `ais_log_z` started at the base-rate model (binary units) or at N(b, sigma^2).
    """
    base = model.base_bias if model.binary else None
    result = ais_log_z(model.rbm, num_chains, num_betas, base, progress)
    v = torch.cat([model.visible_units(xb) for xb in x.split(batch_size)])
    nll, stderr = ais_nll(model.rbm, v, result, batch_size)
    return {
        "nll": nll + model.nll_offset,
        "nll_stderr": stderr,
        "log_z": result.log_z,
        "log_z_stderr": result.stderr,
        "free_energy": nll - result.log_z,
    }


# -- deep energy-based models (model=ebm, `vaekit.ebm`) ----------------------------------------

AIS_STEP_SIZE = 0.05  # the first MALA step size of an EBM's AIS, in standardized units
AIS_TARGET_ACCEPT = 0.6  # the step size adapts, temperature by temperature, towards this rate
AIS_STEP_FACTOR = 1.05
DEQUANTIZATION_DRAWS = 4  # draws of u per test image of E_u[E(y)]


class BoxedNormal(Distribution):
    """A factorized normal truncated to the box [low, high] (every argument shaped like one
    example, its event_shape): density N(x; loc, scale) / (Phi(b) - Phi(a)) per value inside,
    a = (low - loc) / scale, b = (high - loc) / scale; sampled exactly by the inverse cdf (float64).
    The base of an EBM's AIS: normalized, so its log Z is 0."""

    arg_constraints: dict[str, Any] = {}
    has_rsample = False

    def __init__(self, loc: Tensor, scale: Tensor, low: Tensor, high: Tensor) -> None:
        self.loc, self.scale, self.low, self.high = loc, scale, low, high
        a, b = ((low - loc) / scale).double(), ((high - loc) / scale).double()
        # mass inside the box, computed on the side of the lower tail (no 1 - 1 cancellation)
        upper = a > 0
        lo, hi = torch.where(upper, -b, a), torch.where(upper, -a, b)
        self._upper, self._cdf_lo = upper, torch.special.ndtr(lo)
        self._mass = torch.special.ndtr(hi) - self._cdf_lo  # (*shape), float64
        super().__init__(batch_shape=torch.Size(), event_shape=loc.shape, validate_args=False)

    def log_prob(self, x: Tensor) -> Tensor:
        """sum over the event of log N(x; loc, scale) - log mass (-inf outside the box):
        (B, *shape) -> (B,)."""
        z = (x - self.loc) / self.scale
        log_density = -0.5 * z.square() - torch.log(self.scale) - 0.5 * math.log(2 * math.pi)
        log_density = log_density - self._mass.log().to(x.dtype)
        inside = (x >= self.low) & (x <= self.high)
        log_density = torch.where(inside, log_density, torch.full_like(log_density, -math.inf))
        return log_density.flatten(1).sum(1)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Draws (*sample_shape, *shape) by x = loc + scale Phi^-1(u), u ~ U(Phi(a), Phi(b))."""
        shape = torch.Size(sample_shape) + self.event_shape
        u = self._cdf_lo + self._mass * torch.rand(shape, dtype=torch.float64, device=self.loc.device)
        z = torch.special.ndtri(u.clamp(1e-300, 1.0))
        z = torch.where(self._upper, -z, z).to(self.loc.dtype)
        return torch.minimum(torch.maximum(self.loc + self.scale * z, self.low), self.high)


class UniformBox(Distribution):
    """The uniform distribution on the box [low, high] (tensors shaped like one example): density
    1 / prod(high - low) inside, 0 outside."""

    arg_constraints: dict[str, Any] = {}
    has_rsample = False

    def __init__(self, low: Tensor, high: Tensor) -> None:
        self.low, self.high = low, high
        self._log_volume = (high - low).double().log().sum().item()
        super().__init__(batch_shape=torch.Size(), event_shape=low.shape, validate_args=False)

    def log_prob(self, x: Tensor) -> Tensor:
        """-log prod(high - low) inside the box, -inf outside: (B, *shape) -> (B,)."""
        inside = ((x >= self.low) & (x <= self.high)).flatten(1).all(1)
        return torch.where(inside, -self._log_volume, -math.inf).to(x.dtype)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Draws (*sample_shape, *shape)."""
        shape = torch.Size(sample_shape) + self.event_shape
        u = torch.rand(shape, dtype=self.low.dtype, device=self.low.device)
        return self.low + (self.high - self.low) * u


class EvenMixture(Distribution):
    """(1/K) sum_k p_k(x) of K distributions of one event shape: log_prob by logsumexp, draws from a
    component picked uniformly per draw."""

    arg_constraints: dict[str, Any] = {}
    has_rsample = False

    def __init__(self, components: list[Distribution]) -> None:
        self.components = components
        super().__init__(batch_shape=torch.Size(), event_shape=components[0].event_shape, validate_args=False)

    def log_prob(self, x: Tensor) -> Tensor:
        """log (1/K) sum_k p_k(x): (B, *shape) -> (B,)."""
        parts = torch.stack([component.log_prob(x) for component in self.components])  # (K, B)
        return torch.logsumexp(parts, 0) - math.log(len(self.components))

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Draws (n, *shape) for sample_shape (n,): every component drawn, one kept per draw."""
        (n,) = tuple(sample_shape)
        draws = torch.stack([component.sample((n,)) for component in self.components])  # (K, n, *shape)
        pick = torch.randint(len(self.components), (n,), device=draws.device)
        return draws[pick, torch.arange(n, device=draws.device)]


class TemperedEnergy:
    """-log f_beta(x) = -(1 - beta) log p_base(x) + beta E(x), the energy of AIS's intermediate
    distribution at inverse temperature beta: (B, *shape) -> (B,)."""

    def __init__(self, energy: Callable[[Tensor], Tensor], base: Distribution, beta: float) -> None:
        self.energy, self.base, self.beta = energy, base, beta

    def __call__(self, x: Tensor) -> Tensor:
        return (self.beta - 1.0) * self.base.log_prob(x) + self.beta * self.energy(x)


@torch.no_grad()
def energy_ais_log_z(
    energy: Callable[[Tensor], Tensor],
    base: Distribution,
    num_chains: int,
    num_betas: int,
    step_size: float = AIS_STEP_SIZE,
    clamp: tuple[Tensor | float, Tensor | float] | None = None,
    mala_steps: int = 1,
    adapt: bool = True,
    progress: bool = False,
) -> AISResult:
    """log Z = log int exp(-E(x)) dx of any energy (B, *shape) -> (B,) by AIS from a normalized
    `base` distribution (event_shape = one example's), on the path

        log f_k(x) = (1 - beta_k) log p_base(x) - beta_k E(x),   beta_k = k / (K - 1),

    with `mala_steps` MALA steps (`vaekit.evaluation.samplers.langevin`, exact for f_k; proposals
    outside `clamp` rejected, so the target is exp(-E) on that box) per temperature, and

        log w = sum_{k=1}^{K-1} [log f_k(x_k) - log f_{k-1}(x_k)]
              = -sum_k (beta_k - beta_{k-1}) (E(x_k) + log p_base(x_k)),

    log Z ~= log mean w (Z_base = 1), float64. With `adapt` the step size is multiplied or divided
    by AIS_STEP_FACTOR after each temperature as the acceptance rate is above or below
    AIS_TARGET_ACCEPT (as Wu et al., 2017 adapt HMC's); the chains then still give a valid weight
    for every transition, each of which leaves its f_k invariant. `progress`: a bar on a terminal.
    """
    if num_chains < 1:
        raise VaekitError(f"AIS needs at least one chain, not {num_chains}.")
    if num_betas < 2:
        raise VaekitError(f"AIS needs at least 2 inverse temperatures (0 and 1), not {num_betas}.")
    betas = torch.linspace(0.0, 1.0, num_betas, dtype=torch.float64).tolist()
    x = base.sample((num_chains,))
    log_w = torch.zeros(num_chains, dtype=torch.float64, device=x.device)
    shown = None if progress else True  # None: a bar on a terminal only
    for k in tqdm(range(1, num_betas), desc="AIS log Z", unit="beta", leave=False, disable=shown):
        log_w -= (betas[k] - betas[k - 1]) * (energy(x).double() + base.log_prob(x).double())
        if k == num_betas - 1:  # the last sample would only be used by a next weight
            break
        tempered = TemperedEnergy(energy, base, betas[k])
        result = langevin(tempered, x, mala_steps, step_size, clamp=clamp, mala=True)
        x = result.x
        if adapt:
            step_size *= AIS_STEP_FACTOR if result.accept_rate > AIS_TARGET_ACCEPT else 1.0 / AIS_STEP_FACTOR
    log_mean_w, stderr = log_mean_exp_stderr(log_w)
    return AISResult(log_z=log_mean_w, stderr=stderr, log_weights=log_w)


class StandardizedEnergy:
    """E(m + s z) of standardized values z = (y - m) / s: (B, *shape) -> (B,). AIS runs in these
    coordinates, so one isotropic MALA step size suits pixels of very different spread."""

    def __init__(self, energy: Callable[[Tensor], Tensor], mean: Tensor, std: Tensor) -> None:
        self.energy, self.mean, self.std = energy, mean, std

    def __call__(self, z: Tensor) -> Tensor:
        return self.energy(self.mean + self.std * z)


@torch.no_grad()
def ebm_log_z(model: Any, num_chains: int, num_betas: int, progress: bool = False) -> AISResult:
    """log Z of a model=ebm (`vaekit.ebm.EnergyModel`) on its data range by `energy_ais_log_z`, from
    an even mixture of the factorized normal fitted to the training split (data_mean, data_std)
    truncated to the range and the uniform distribution on it: the first suits a model close to the
    data, the second finds the mass of one that is not (which a base near the data alone would miss,
    badly underestimating log Z). Run in standardized coordinates z = (y - m) / s, so
    log Z = log Z_z + sum log s."""
    mean, std = model.data_mean, model.data_std
    low, high = ((value - mean) / std for value in model.data_range)
    fitted = BoxedNormal(torch.zeros_like(mean), torch.ones_like(std), low, high)
    base = EvenMixture([fitted, UniformBox(low, high)])
    result = energy_ais_log_z(StandardizedEnergy(model.energy, mean, std), base, num_chains, num_betas,
                              clamp=(low, high), progress=progress)  # fmt: skip
    jacobian = std.double().log().sum().item()
    return AISResult(log_z=result.log_z + jacobian, stderr=result.stderr, log_weights=result.log_weights)


@torch.no_grad()
def ebm_estimates(
    model: Any,
    x: Tensor,
    num_chains: int,
    num_betas: int,
    batch_size: int = 4096,
    draws: int = DEQUANTIZATION_DRAWS,
    progress: bool = False,
) -> dict[str, float]:
    """Test numbers of a model=ebm on images x (N, C, H, W) in [0, 1], nats:

    {"nll", "nll_stderr", "log_z", "log_z_stderr", "energy"}, with the dequantization bound
    nll = mean_n E_u[E(y_n)] + log Z + D log L (`draws` draws of u per image), its stderr from the
    spread over images and the AIS stderr as independent errors (as `ais_nll`), log Z from
    `ebm_log_z`, which is also recorded in `model.log_z`. AIS's log Z is a stochastic lower bound
    (E[log Z_hat] <= log Z, Jensen), so this NLL is optimistic by the AIS error.
    """
    result = ebm_log_z(model, num_chains, num_betas, progress)
    model.log_z.fill_(result.log_z)
    energies = torch.cat([
        torch.stack([model.energy(model.dequantize(xb)).double() for _ in range(draws)]).mean(0)
        for xb in x.split(batch_size)
    ])  # fmt: skip
    n = energies.numel()
    spread = energies.std().item() / math.sqrt(n) if n > 1 else 0.0
    energy = energies.mean().item()
    return {
        "nll": energy + result.log_z + model.nll_offset,
        "nll_stderr": math.sqrt(spread**2 + result.stderr**2),
        "log_z": result.log_z,
        "log_z_stderr": result.stderr,
        "energy": energy,
    }
