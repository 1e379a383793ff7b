"""Training objectives, the one place each loss is defined: the ELBO (with beta, KL warm-up
and free bits) and the IWAE bound (Burda et al., 2016) with standard or doubly-reparameterized
gradients (DReG, Tucker et al., 2019).

The `objective` config group picks one (`objective=elbo|iwae`, `objective.k`,
`objective.gradient=standard|dreg`); `build_objective` turns its plain settings into an
`Objective`, which the Trainer calls once per batch and asks for its validation signal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Independent, Normal

from vaekit.errors import VaekitError

GRADIENTS = ("standard", "dreg")


@dataclass(frozen=True)
class ELBO:
    """Per-example terms (B,) in nats. nelbo = rec + kl; loss is what training minimises
    (equal to nelbo unless beta, KL warm-up, free bits or another objective are on)."""

    loss: Tensor
    rec: Tensor
    kl: Tensor
    kl_per_level: dict[str, Tensor]

    @property
    def nelbo(self) -> Tensor:
        """-ELBO = -E_q[log p(x|z)] + KL(q(z|x) || p(z)), shape (B,)."""
        return self.rec + self.kl

    def logged_terms(self) -> dict[str, Tensor]:
        """The per-example terms (B,) the Trainer sums over an epoch: rec and kl/<level>."""
        return {"rec": self.rec, **{f"kl/{name}": kl for name, kl in self.kl_per_level.items()}}


def make_elbo(
    rec: Tensor, kl_per_level: dict[str, Tensor], beta: float = 1.0, free_bits: float = 0.0
) -> ELBO:
    """The ELBO objective of every model's forward pass.

    loss = rec + beta * sum_levels max(KL_level, free_bits): beta is trainer.beta times the
    KL warm-up factor (Sonderby et al., 2016), so beta > 1 is the beta-VAE (Higgins et al., 2017);
    the free-bits floor (Kingma et al., 2016), in nats per level and example, stops the optimiser
    from pushing a level's KL below it (against collapse). The reported nelbo =
    rec + sum_levels KL_level is unaffected by either.
    """
    kl = sum(kl_per_level.values())
    penalty = kl if free_bits <= 0 else sum(k.clamp(min=free_bits) for k in kl_per_level.values())
    return ELBO(loss=rec + beta * penalty, rec=rec, kl=kl, kl_per_level=kl_per_level)


def log_weights_of(log_p_x: Tensor, level_terms: dict[str, Tensor], beta: float = 1.0) -> Tensor:
    """log w = log p(x|z) - beta * sum_levels [log q(z_l|.) - log p(z_l|.)]; with beta = 1 this is
    log p(x, z) - log q(z|x).

    The inputs are what every model's `weight_terms(x, k)` returns, each (k, B); averaged over
    the k draws, -log p(x|z) is the reconstruction term and each level term that level's KL.
    """
    return log_p_x - beta * sum(level_terms.values())


class Objective:
    """What the Trainer minimises per batch, and the validation number early stopping watches.

    `stopping_key`: the key of `validation_terms`'s result that early stopping uses.
    """

    name = "elbo"
    stopping_key = "nelbo"

    def check(self, model: nn.Module) -> None:
        """Refuse, in one sentence, a model (or its posterior) this objective cannot serve."""

    def __call__(
        self, model: nn.Module, x: Tensor, beta: float, free_bits: float, y: Tensor | None = None
    ) -> ELBO:
        """The batch's per-example loss and terms: one draw per example, `make_elbo`. `y` (B,):
        the batch's labels, passed to conditional models only (None otherwise)."""
        return model(x, beta=beta, free_bits=free_bits, **labels_of(y))

    def validation_terms(
        self, model: nn.Module, x: Tensor, batch_size: int, shard: Any, y: Tensor | None = None
    ) -> dict[str, float]:
        """The validation numbers of the epoch (global RNG seeded by the caller): the NELBO and
        its terms (`vaekit.evaluation.metrics.nelbo_terms`), with `stopping_key` among them."""
        from vaekit.evaluation.metrics import nelbo_terms

        return nelbo_terms(model, x, batch_size, shard, **labels_of(y))


class IWAE(Objective):
    """The k-sample importance-weighted bound (Burda et al., 2016), per example:

        L_k(x) = logsumexp_j log w_j - log k,   log w_j = log p(x|z_j) - beta log q(z_j|x)/p(z_j)

    with z_1..z_k ~ q(z|x) drawn in one batched call (`weight_terms(x, k)`), loss = -L_k. k = 1 is
    the ELBO with a Monte Carlo KL. gradient="dreg" gives the encoder the doubly-reparameterized
    gradient (Tucker et al., 2019): log q is evaluated with the posterior's parameters stopped,
    and the gradient reaching z_j is weighted by the normalized weight w~_j once more, so the
    encoder gets sum_j w~_j^2 d log w_j / dz_j dz_j/dphi while the decoder and prior keep the
    standard sum_j w~_j grad log w_j. The reported rec and KL are the means over the k draws.
    """

    name = "iwae"
    stopping_key = "iwae"

    def __init__(self, k: int, gradient: str = "standard") -> None:
        self.k = k
        self.gradient = gradient

    def check(self, model: nn.Module) -> None:
        """IWAE needs `weight_terms` (every VAE of vaekit); DReG the one-level VAE with a
        Gaussian posterior, whose log q can be evaluated with its parameters stopped."""
        if not hasattr(model, "weight_terms"):
            raise VaekitError(
                f"objective=iwae needs a latent-variable model with importance weights, which "
                f"{type(model).__name__} is not: use objective=elbo."
            )
        if self.gradient == "dreg" and not getattr(model, "dreg_ready", False):
            posterior = type(getattr(model, "posterior", None)).__name__
            raise VaekitError(
                f"objective.gradient=dreg is built for model=vae with posterior=gaussian, not for "
                f"{type(model).__name__} with {posterior}: use objective.gradient=standard."
            )

    def __call__(
        self, model: nn.Module, x: Tensor, beta: float, free_bits: float, y: Tensor | None = None
    ) -> ELBO:
        """Per-example loss -L_k (B,) whose gradient is the standard or the DReG one."""
        if self.gradient == "dreg":
            log_p_x, levels, z = model.dreg_terms(x, self.k, **labels_of(y))
        else:
            log_p_x, levels = model.weight_terms(x, self.k, **labels_of(y))
        log_w = log_weights_of(log_p_x, levels, beta)  # (k, B)
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.k)  # (B,)
        loss = -bound
        if self.gradient == "dreg":
            loss = dreg_surrogate(log_w, z) - bound.detach()
        kl_per_level = {name: term.mean(0) for name, term in levels.items()}
        rec = -log_p_x.mean(0)
        return ELBO(loss=loss, rec=rec, kl=sum(kl_per_level.values()), kl_per_level=kl_per_level)

    def validation_terms(
        self, model: nn.Module, x: Tensor, batch_size: int, shard: Any, y: Tensor | None = None
    ) -> dict[str, float]:
        """The NELBO's terms and {"iwae": -L_k} averaged over x, the number early stopping
        watches (the IW-NLL pass with k draws, `vaekit.evaluation.importance`)."""
        from vaekit.evaluation.importance import importance_estimates

        terms = super().validation_terms(model, x, batch_size, shard, y)
        labels = labels_of(y)
        estimates = importance_estimates(
            model, x, self.k, nelbo_draws=1, progress=False, shard=shard, **labels
        )
        return {**terms, "iwae": estimates["iw_nll"]}


@dataclass(frozen=True)
class CDTerms:
    """Per-example terms (B,) of a contrastive-divergence step: loss = F(v) - mean F(v-), whose
    batch mean is the CD loss; free_energy = F(v) of the data."""

    loss: Tensor
    free_energy: Tensor

    def logged_terms(self) -> dict[str, Tensor]:
        """The terms the Trainer sums over an epoch: free_energy and cd_gap (= loss)."""
        return {"free_energy": self.free_energy, "cd_gap": self.loss}


class AISValidated(Objective):
    """Base of the objectives of models without importance weights (RBM, EBM), which early stopping
    judges by a short AIS estimate of the validation NLL: `val_chains` chains, `val_betas`
    temperatures, at the trainer's fixed validation seed (their losses are no likelihood)."""

    stopping_key = "nll"

    def __init__(self, val_chains: int, val_betas: int) -> None:
        self.val_chains = val_chains
        self.val_betas = val_betas


class ContrastiveDivergence(AISValidated):
    """CD-k (Hinton, 2002) or persistent CD (Tieleman, 2008) for model=rbm (`vaekit.image_rbm`):

        loss = mean_data F(v) - mean_negatives F(v-),

    with v- from `model.rbm.negatives` (cd_k Gibbs steps from the data, or from the persistent
    chains), held fixed, so d loss / d theta is the CD estimate of -d log p(v) / d theta.
    Validation: a short AIS estimate of log Z (`val_chains` chains, `val_betas` temperatures, at
    the trainer's fixed validation seed) gives the validation NLL early stopping watches.
    """

    name = "cd"

    def __call__(
        self, model: nn.Module, x: Tensor, beta: float, free_bits: float, y: Tensor | None = None
    ) -> CDTerms:
        """Per-example CD loss (B,) and free energies of the batch x (B, C, H, W)."""
        rbm = model.rbm
        v = model.visible_units(x)
        free = rbm.free_energy(v)
        negative = rbm.free_energy(rbm.negatives(v)).mean()
        return CDTerms(loss=free - negative, free_energy=free)

    def validation_terms(
        self, model: nn.Module, x: Tensor, batch_size: int, shard: Any, y: Tensor | None = None
    ) -> dict[str, float]:
        """{"nll": the short-AIS test NLL of x, "free_energy": mean F(v), "log_z": its AIS log Z}."""
        from vaekit.evaluation.ais import rbm_estimates

        estimates = rbm_estimates(model, x, self.val_chains, self.val_betas, batch_size)
        return {key: estimates[key] for key in ("nll", "free_energy", "log_z")}


@dataclass(frozen=True)
class EnergyTerms:
    """Per-example terms (B,) of a contrastive EBM step, example i paired with negative i:
    loss = E(x+) - E(x-) + alpha (E(x+)^2 + E(x-)^2), whose batch mean is the loss;
    sgld_grad_norm: the sampler's mean gradient norm at its last step, the same for every example."""

    loss: Tensor
    energy_data: Tensor
    energy_negatives: Tensor
    sgld_grad_norm: Tensor

    def logged_terms(self) -> dict[str, Tensor]:
        """The terms the Trainer sums over an epoch: the energies of data and negatives, their gap
        (data minus negatives) and the sampler's gradient norm."""
        return {
            "energy_data": self.energy_data,
            "energy_negatives": self.energy_negatives,
            "energy_gap": self.energy_data - self.energy_negatives,
            "sgld_grad_norm": self.sgld_grad_norm,
        }


class ContrastiveEnergy(AISValidated):
    """The contrastive loss of a deep EBM (Du & Mordatch, 2019) for model=ebm (`vaekit.ebm`):

        loss = mean E(x+) - mean E(x-) + alpha (mean E(x+)^2 + mean E(x-)^2),

    x+ the batch dequantized afresh, x- as many negatives from `model.negatives` (SGLD from the
    replay buffer, held fixed), alpha = model.alpha; its gradient is the maximum-likelihood one,
    E_data[grad E] - E_model[grad E], with the negatives standing in for the model's samples, plus
    the regularizer that keeps energies near 0. Works for any model with `dequantize`, `energy`,
    `negatives` and `alpha` and any example shape. Validation: a short AIS estimate of log Z
    (`val_chains` chains, `val_betas` temperatures, at the trainer's fixed validation seed) gives
    the validation NLL early stopping watches (the loss itself is no likelihood).
    """

    name = "contrastive"

    def __call__(
        self, model: nn.Module, x: Tensor, beta: float, free_bits: float, y: Tensor | None = None
    ) -> EnergyTerms:
        """Per-example loss (B,) and energies of the batch x (B, *shape) and of B negatives."""
        positives = model.dequantize(x)
        sampled = model.negatives(x.shape[0])
        energy_data, energy_negatives = model.energy(positives), model.energy(sampled.x)
        penalty = energy_data.square() + energy_negatives.square()
        loss = energy_data - energy_negatives + model.alpha * penalty
        grad_norm = torch.full_like(energy_data.detach(), sampled.grad_norm)
        return EnergyTerms(loss, energy_data, energy_negatives, grad_norm)

    def validation_terms(
        self, model: nn.Module, x: Tensor, batch_size: int, shard: Any, y: Tensor | None = None
    ) -> dict[str, float]:
        """{"nll": the short-AIS dequantized NLL of x, "energy": mean E(y), "log_z": its AIS log Z,
        also recorded in model.log_z (so best.pt holds the estimate of its weights)}."""
        from vaekit.evaluation.ais import ebm_estimates

        estimates = ebm_estimates(model, x, self.val_chains, self.val_betas, batch_size, draws=1)
        return {key: estimates[key] for key in ("nll", "energy", "log_z")}


def objective_for(settings: Any, model: nn.Module, evaluation: Any = None) -> Objective:
    """The objective that trains `model`: an RBM's contrastive divergence or an EBM's contrastive
    loss (for which the `objective` group must stay at elbo), else the `objective` group's
    (`build_objective`), checked against the model. `evaluation`: the eval settings
    (val_ais_chains, val_ais_betas)."""
    objective = build_objective(settings)
    trained_by = getattr(model, "trained_by", None)
    if trained_by not in ("cd", "contrastive"):
        objective.check(model)
        return objective
    if objective.name != "elbo":
        how = "contrastive divergence (model.cd_k, model.persistent)" if trained_by == "cd" else (
            "its contrastive loss (model.alpha, model.sgld_steps)"
        )
        raise VaekitError(
            f"model={'rbm' if trained_by == 'cd' else 'ebm'} is trained by {how}, not by "
            f"objective={objective.name}: drop the objective setting."
        )
    chains = getattr(evaluation, "val_ais_chains", 16) if evaluation is not None else 16
    betas = getattr(evaluation, "val_ais_betas", 1000) if evaluation is not None else 1000
    if trained_by == "contrastive":
        return ContrastiveEnergy(chains, betas)
    return ContrastiveDivergence(chains, betas)


def labels_of(y: Tensor | None) -> dict[str, Tensor]:
    """{"y": y} for a conditional model's call, {} when there are no labels to pass."""
    return {} if y is None else {"y": y}


def dreg_surrogate(log_w: Tensor, z: Tensor) -> Tensor:
    """A per-example (B,) surrogate whose value is 0 and whose gradient is DReG's.

    -sum_j w~_j log w_j gives every parameter the standard IWAE gradient; a hook on z (k, B, L)
    multiplies the gradient flowing back through the draws by w~_j again, which (with log q's
    parameters stopped in log_w) is the encoder's doubly-reparameterized gradient.
    """
    weights = torch.softmax(log_w.detach(), dim=0)  # (k, B) normalized importance weights
    if z.requires_grad:
        z.register_hook(_WeightGradient(weights))
    surrogate = -(weights * log_w).sum(0)
    return surrogate - surrogate.detach()


class _WeightGradient:
    """A tensor hook: grad (k, B, L) times the weights (k, B) (a class, not a lambda: picklable)."""

    def __init__(self, weights: Tensor) -> None:
        self.weights = weights

    def __call__(self, grad: Tensor) -> Tensor:
        return grad * self.weights.unsqueeze(-1).to(grad.dtype)


def stopped(q_z: Any) -> Independent:
    """A diagonal Gaussian q(z|x) with its parameters detached (DReG's log q); other posteriors
    are refused in one sentence."""
    base = q_z.base_dist if isinstance(q_z, Independent) else None
    if not isinstance(base, Normal):
        raise VaekitError(
            "objective.gradient=dreg needs posterior=gaussian (log q with its parameters stopped): "
            "use objective.gradient=standard with this posterior."
        )
    return Independent(Normal(base.loc.detach(), base.scale.detach(), validate_args=False), 1)


def build_objective(settings: Any) -> Objective:
    """The objective of the `objective` group's plain settings (None or name elbo: the ELBO).

    Refuses an unknown name, k < 1, an unknown gradient or a setting the objective does not
    take, in one sentence each."""
    values = dict(settings or {})
    name = values.pop("name", "elbo")
    if name == "elbo":
        if values:
            key = sorted(values)[0]
            raise VaekitError(f"objective.{key} applies to objective=iwae, not to objective=elbo.")
        return Objective()
    if name != "iwae":
        raise VaekitError(f"objective must be elbo or iwae, not {name}.")
    k, gradient = values.pop("k", 1), values.pop("gradient", "standard")
    if values:
        raise VaekitError(f"objective.{sorted(values)[0]} is not a setting of objective=iwae (k, gradient).")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise VaekitError(f"objective.k must be a whole number of samples, at least 1, not {k}.")
    if gradient not in GRADIENTS:
        raise VaekitError(f"objective.gradient must be standard or dreg, not {gradient}.")
    return IWAE(k, gradient)
