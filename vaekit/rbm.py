"""Restricted Boltzmann machines with binary hidden units h in {0, 1}^H: Bernoulli visible
units (BernoulliRBM) and Gaussian visible units (GaussianBernoulliRBM).

Shapes: v (B, D) (image batches (B, *shape) with prod(shape) = D are flattened), h (B, H),
weight W (D, H), visible_bias b (D,), hidden_bias c (H,). Energies are in nats.

Every conditional, free energy and Gibbs step also takes AIS's inverse temperature `beta`
(default 1, the model itself) and a base model A with visible biases b_A and no weights
(`base_visible_bias`, default b): the intermediate distribution on the joint

    p_beta(v, h) ∝ exp(-(1 - beta) E_A(v) - beta E(v, h)),

with h uniform under A, so every formula is written once for the model and its annealing
path (Salakhutdinov & Murray, 2008). Randomness comes from torch's global RNG only, so a
trainer that restores the RNG states resumes a chain exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaekit.errors import VaekitError

# log_z_exact enumerates 2^H hidden states; beyond this it is hopeless anyway.
MAX_EXACT_HIDDEN = 20
# Hidden states per chunk of the enumeration, so memory stays at (chunk, D) whatever H is.
ENUMERATION_CHUNK = 2**12


def binary_states(n: int, start: int = 0, stop: int | None = None, dtype: torch.dtype = torch.float32,
                  device: torch.device | None = None) -> Tensor:
    """The binary codes of the integers start..stop-1 (default all 2^n), bit i in column i:
    shape (stop - start, n)."""
    stop = 2**n if stop is None else stop
    codes = torch.arange(start, stop, device=device)
    return ((codes[:, None] >> torch.arange(n, device=device)) & 1).to(dtype)


class RBM(nn.Module):
    """Base class: W, b, c, the CD-k / PCD negatives and loss, exact log Z by enumeration.

    Subclasses define the visible side: `hidden_logits`, `visible_energy`, `visible_mean`,
    `sample_visible`, `hidden_free_energy` and `base_log_z`.

    With `persistent` (PCD, Tieleman 2008) the model keeps `num_chains` fantasy particles in
    the buffer `chains` (num_chains, D), saved in the state_dict; they start at construction
    as draws from the model at zero weights and biases (fair coins / standard normals) and
    are advanced in place by `negatives`. Without it `chains` is None (not in the state_dict)
    and CD-k (Hinton, 2002) starts its cd_k Gibbs steps at the data.
    """

    continuous_visible: bool = False  # True where v is real-valued (Langevin can sample it)

    def __init__(self, visible: int, hidden: int, cd_k: int = 1, persistent: bool = False,
                 num_chains: int = 100) -> None:
        super().__init__()
        if visible < 1 or hidden < 1:
            raise VaekitError(
                f"an RBM needs at least one visible and one hidden unit, not {visible} and {hidden}."
            )
        if cd_k < 1:
            raise VaekitError(f"model.cd_k must be at least 1 Gibbs step, not {cd_k}.")
        if persistent and num_chains < 1:
            raise VaekitError(f"model.num_chains must be at least 1 for persistent chains, not {num_chains}.")
        self.visible = visible
        self.hidden = hidden
        self.cd_k = cd_k
        self.persistent = persistent
        self.num_chains = num_chains
        self.weight = nn.Parameter(0.01 * torch.randn(visible, hidden))
        self.visible_bias = nn.Parameter(torch.zeros(visible))
        self.hidden_bias = nn.Parameter(torch.zeros(hidden))
        self.register_buffer("chains", None)

    def _start_chains(self) -> None:
        """Called at the end of a subclass's __init__, once its visible parameters exist."""
        if self.persistent:
            with torch.no_grad():
                self.chains = self.sample_visible(self.weight.new_zeros(self.num_chains, self.hidden))

    def flatten_visible(self, v: Tensor) -> Tensor:
        """(B, *shape) -> (B, D), refusing inputs whose size per example is not D."""
        v = v.reshape(v.shape[0], -1)
        if v.shape[1] != self.visible:
            raise VaekitError(
                f"the RBM has {self.visible} visible units, but its input has {v.shape[1]} values "
                "per example."
            )
        return v

    def _base(self, base_visible_bias: Tensor | None) -> Tensor:
        return self.visible_bias if base_visible_bias is None else base_visible_bias

    def tempered_visible_bias(self, beta: float = 1.0, base_visible_bias: Tensor | None = None) -> Tensor:
        """(1 - beta) b_A + beta b, (D,)."""
        if beta == 1.0:
            return self.visible_bias
        return (1.0 - beta) * self._base(base_visible_bias) + beta * self.visible_bias

    def visible_drive(self, h: Tensor, beta: float = 1.0, base_visible_bias: Tensor | None = None) -> Tensor:
        """(1 - beta) b_A + beta (b + W h), (B, H) -> (B, D): the logits of p(v|h) for binary
        visible units, its mean for Gaussian ones."""
        return self.tempered_visible_bias(beta, base_visible_bias) + beta * (h @ self.weight.T)

    # -- the visible side, defined by the subclasses ------------------------------------------

    def hidden_logits(self, v: Tensor) -> Tensor:  # pragma: no cover - interface
        """c + (scaled v) W: the logits of p(h|v), (B, D) -> (B, H)."""
        raise NotImplementedError

    def visible_energy(self, v: Tensor, beta: float = 1.0,
                       base_visible_bias: Tensor | None = None) -> Tensor:  # pragma: no cover
        """The part of the energy without h, (1 - beta) E_A(v) + beta E_v(v): (B, D) -> (B,)."""
        raise NotImplementedError

    def visible_mean(self, h: Tensor, beta: float = 1.0,
                     base_visible_bias: Tensor | None = None) -> Tensor:  # pragma: no cover
        """E[v|h] under p_beta, (B, H) -> (B, D)."""
        raise NotImplementedError

    def sample_visible(self, h: Tensor, beta: float = 1.0,
                       base_visible_bias: Tensor | None = None) -> Tensor:  # pragma: no cover
        """v ~ p_beta(v|h), (B, H) -> (B, D)."""
        raise NotImplementedError

    def hidden_free_energy(self, h: Tensor) -> Tensor:  # pragma: no cover - interface
        """-log sum_v exp(-E(v, h)) (an integral for continuous v), (N, H) -> (N,)."""
        raise NotImplementedError

    def base_log_z(self, base_visible_bias: Tensor | None = None) -> Tensor:  # pragma: no cover
        """log Z_A of the base model on the joint (h uniform, so it includes H log 2): 0-dim."""
        raise NotImplementedError

    # -- shared formulas ----------------------------------------------------------------------

    def energy(self, v: Tensor, h: Tensor) -> Tensor:
        """E(v, h) = visible_energy(v) - h . hidden_logits(v): v (B, D or *shape), h (B, H) -> (B,)."""
        v = self.flatten_visible(v)
        return self.visible_energy(v) - (h * self.hidden_logits(v)).sum(-1)

    def free_energy(self, v: Tensor, beta: float = 1.0, base_visible_bias: Tensor | None = None) -> Tensor:
        """F_beta(v) = -log sum_h exp(-(1 - beta) E_A(v) - beta E(v, h))
        = visible_energy_beta(v) - sum_j softplus(beta hidden_logits_j(v)): (B, D or *shape) -> (B,)."""
        v = self.flatten_visible(v)
        hidden_term = F.softplus(beta * self.hidden_logits(v)).sum(-1)
        return self.visible_energy(v, beta, base_visible_bias) - hidden_term

    def hidden_probs(self, v: Tensor, beta: float = 1.0) -> Tensor:
        """p_beta(h_j = 1 | v) = sigmoid(beta hidden_logits_j(v)): (B, D or *shape) -> (B, H)."""
        return torch.sigmoid(beta * self.hidden_logits(self.flatten_visible(v)))

    def sample_hidden(self, v: Tensor, beta: float = 1.0) -> Tensor:
        """h ~ p_beta(h|v), binary floats: (B, D or *shape) -> (B, H)."""
        return torch.bernoulli(self.hidden_probs(v, beta))

    def gibbs_step(self, v: Tensor, beta: float = 1.0, base_visible_bias: Tensor | None = None) -> Tensor:
        """One block Gibbs step v -> h ~ p_beta(h|v) -> v' ~ p_beta(v|h), which leaves p_beta
        invariant: (B, D or *shape) -> (B, D)."""
        return self.sample_visible(self.sample_hidden(v, beta), beta, base_visible_bias)

    @torch.no_grad()
    def negatives(self, v_data: Tensor) -> Tensor:
        """Model samples for the negative phase, detached, (B, D or *shape) -> (B, D), or
        (num_chains, D) when persistent: cd_k Gibbs steps from the data (CD-k) or from the
        persistent chains, which are then overwritten in place with the result (PCD)."""
        v = self.flatten_visible(v_data)
        if self.persistent:
            v = self.chains
        for _ in range(self.cd_k):
            v = self.gibbs_step(v)
        if self.persistent:
            self.chains.copy_(v)
        return v

    def cd_loss(self, v_data: Tensor, v_model: Tensor) -> Tensor:
        """mean_data F(v) - mean_model F(v), a scalar whose gradient is the CD / PCD estimate of
        -d log-likelihood: for W it is -(<v p(h|v)^T>_data - <v p(h|v)^T>_model). v_data
        (B, D or *shape), v_model (N, D) from `negatives` (held fixed: it carries no graph)."""
        return self.free_energy(v_data).mean() - self.free_energy(v_model.detach()).mean()

    def hidden_states(self) -> Iterator[Tensor]:
        """All 2^H hidden configurations in chunks of at most ENUMERATION_CHUNK rows, (n, H) each."""
        for start in range(0, 2**self.hidden, ENUMERATION_CHUNK):
            stop = min(start + ENUMERATION_CHUNK, 2**self.hidden)
            yield binary_states(self.hidden, start, stop, self.weight.dtype, self.weight.device)

    def log_z_exact(self) -> Tensor:
        """log Z = logsumexp_h -hidden_free_energy(h) over all 2^H hidden states, the visible side
        summed (or integrated) analytically: a 0-dim tensor (differentiable). Tiny models only."""
        if self.hidden > MAX_EXACT_HIDDEN:
            raise VaekitError(
                f"exact log Z enumerates 2^hidden states, so it needs at most {MAX_EXACT_HIDDEN} "
                f"hidden units, not {self.hidden}: use AIS instead."
            )
        parts = [torch.logsumexp(-self.hidden_free_energy(h), 0) for h in self.hidden_states()]
        return torch.logsumexp(torch.stack(parts), 0)

    def log_prob_exact(self, v: Tensor) -> Tensor:
        """log p(v) = -F(v) - log Z (a log-density for Gaussian visible units): (B, D or *shape) -> (B,)."""
        return -self.free_energy(v) - self.log_z_exact()


class BernoulliRBM(RBM):
    """RBM with binary visible units v in {0, 1}^D (Smolensky, 1986; Hinton, 2002).

    E(v, h) = -b.v - c.h - v W h,   F(v) = -b.v - sum_j softplus(c_j + (v W)_j),
    p(h_j = 1 | v) = sigmoid(c_j + (v W)_j),   p(v_i = 1 | h) = sigmoid(b_i + (W h)_i).
    Base model A: p_A(v) = prod_i Bernoulli(sigmoid(b_A,i)), E_A(v) = -b_A.v.
    """

    def __init__(self, visible: int, hidden: int, cd_k: int = 1, persistent: bool = False,
                 num_chains: int = 100) -> None:
        super().__init__(visible, hidden, cd_k, persistent, num_chains)
        self._start_chains()

    def hidden_logits(self, v: Tensor) -> Tensor:
        """c + v W: (B, D) -> (B, H)."""
        return self.hidden_bias + v @ self.weight

    def visible_energy(self, v: Tensor, beta: float = 1.0, base_visible_bias: Tensor | None = None) -> Tensor:
        """-((1 - beta) b_A + beta b) . v: (B, D) -> (B,)."""
        return -(v @ self.tempered_visible_bias(beta, base_visible_bias))

    def visible_mean(self, h: Tensor, beta: float = 1.0, base_visible_bias: Tensor | None = None) -> Tensor:
        """p_beta(v_i = 1 | h) = sigmoid((1 - beta) b_A,i + beta (b_i + (W h)_i)): (B, H) -> (B, D)."""
        return torch.sigmoid(self.visible_drive(h, beta, base_visible_bias))

    def sample_visible(self, h: Tensor, beta: float = 1.0, base_visible_bias: Tensor | None = None) -> Tensor:
        """v ~ p_beta(v|h), binary floats: (B, H) -> (B, D)."""
        return torch.bernoulli(self.visible_mean(h, beta, base_visible_bias))

    def hidden_free_energy(self, h: Tensor) -> Tensor:
        """-log sum_v exp(-E(v, h)) = -c.h - sum_i softplus(b_i + (W h)_i): (N, H) -> (N,)."""
        return -(h @ self.hidden_bias) - F.softplus(self.visible_drive(h)).sum(-1)

    def base_log_z(self, base_visible_bias: Tensor | None = None) -> Tensor:
        """log Z_A = H log 2 + sum_i softplus(b_A,i): 0-dim."""
        return self.hidden * math.log(2.0) + F.softplus(self._base(base_visible_bias)).sum()


class GaussianBernoulliRBM(RBM):
    """RBM with Gaussian visible units v in R^D of per-unit standard deviation sigma
    (Cho, Ilin & Raiko, 2011 parameterisation; Krizhevsky, 2009 fixes sigma = 1):

        E(v, h) = sum_i (v_i - b_i)^2 / (2 sigma_i^2) - c.h - sum_ij (v_i / sigma_i^2) W_ij h_j,
        p(v|h) = N(b + W h, diag(sigma^2)),   p(h_j = 1 | v) = sigmoid(c_j + ((v / sigma^2) W)_j),
        F(v) = sum_i (v_i - b_i)^2 / (2 sigma_i^2) - sum_j softplus(c_j + ((v / sigma^2) W)_j).

    sigma = exp(log_sigma), a parameter with `learn_sigma`, else a buffer fixed at 1.
    Base model A: p_A(v) = N(b_A, diag(sigma^2)) with the same sigma, E_A(v) = sum_i
    (v_i - b_A,i)^2 / (2 sigma_i^2).
    """

    continuous_visible = True

    def __init__(self, visible: int, hidden: int, cd_k: int = 1, persistent: bool = False,
                 num_chains: int = 100, learn_sigma: bool = True) -> None:
        super().__init__(visible, hidden, cd_k, persistent, num_chains)
        self.learn_sigma = learn_sigma
        if learn_sigma:
            self.log_sigma = nn.Parameter(torch.zeros(visible))
        else:
            self.register_buffer("log_sigma", torch.zeros(visible))
        self._start_chains()

    @property
    def sigma(self) -> Tensor:
        """Per-unit standard deviation exp(log_sigma), (D,)."""
        return self.log_sigma.exp()

    def hidden_logits(self, v: Tensor) -> Tensor:
        """c + (v / sigma^2) W: (B, D) -> (B, H)."""
        return self.hidden_bias + (v * torch.exp(-2.0 * self.log_sigma)) @ self.weight

    def visible_energy(self, v: Tensor, beta: float = 1.0, base_visible_bias: Tensor | None = None) -> Tensor:
        """sum_i [(1 - beta)(v_i - b_A,i)^2 + beta (v_i - b_i)^2] / (2 sigma_i^2): (B, D) -> (B,)."""
        squares = beta * (v - self.visible_bias).square()
        if beta != 1.0:
            squares = squares + (1.0 - beta) * (v - self._base(base_visible_bias)).square()
        return (0.5 * squares * torch.exp(-2.0 * self.log_sigma)).sum(-1)

    def visible_mean(self, h: Tensor, beta: float = 1.0, base_visible_bias: Tensor | None = None) -> Tensor:
        """E_beta[v|h] = (1 - beta) b_A + beta (b + W h): (B, H) -> (B, D)."""
        return self.visible_drive(h, beta, base_visible_bias)

    def sample_visible(self, h: Tensor, beta: float = 1.0, base_visible_bias: Tensor | None = None) -> Tensor:
        """v ~ N(visible_mean, diag(sigma^2)) (the same sigma at every beta): (B, H) -> (B, D)."""
        mean = self.visible_mean(h, beta, base_visible_bias)
        return mean + self.sigma * torch.randn_like(mean)

    def hidden_free_energy(self, h: Tensor) -> Tensor:
        """-log int exp(-E(v, h)) dv = -c.h - sum_i [(b_i m_i + m_i^2 / 2) / sigma_i^2
        + log(sqrt(2 pi) sigma_i)] with m = W h (completing the square): (N, H) -> (N,)."""
        m = h @ self.weight.T  # (N, D)
        inv_var = torch.exp(-2.0 * self.log_sigma)
        log_norm = (self.log_sigma + 0.5 * math.log(2 * math.pi)).sum()
        completed = ((self.visible_bias * m + 0.5 * m.square()) * inv_var).sum(-1)
        return -(h @ self.hidden_bias) - completed - log_norm

    def base_log_z(self, base_visible_bias: Tensor | None = None) -> Tensor:
        """log Z_A = H log 2 + sum_i log(sqrt(2 pi) sigma_i) (independent of b_A): 0-dim."""
        return self.hidden * math.log(2.0) + (self.log_sigma + 0.5 * math.log(2 * math.pi)).sum()
