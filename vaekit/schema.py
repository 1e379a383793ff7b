"""Typed schema of the run settings, registered with Hydra's ConfigStore: each default is
written once, here (the yaml files do not repeat them).

The trainer and eval nodes are dataclasses, so a misspelled key or a value of the wrong
type fails when the config is loaded, not an hour into training. The component groups
(model, prior, posterior, dataset, likelihood, net, optimizer) stay free-form: each
option is a `_target_` plus its arguments, and Hydra's struct mode still rejects keys
they do not declare.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import MISSING, OmegaConf


@dataclass
class TrainerConfig:
    """How the model is fitted."""

    max_epochs: int = 1000
    batch_size: int = 64
    patience: int = 20  # epochs without validation improvement before stopping
    min_delta: float = 0.0  # an improvement must beat the best by more than this (nats)
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps
    seed: int = 0
    compile: bool = False  # torch.compile the model's forward pass
    deterministic: bool = False  # GPU runs that repeat bitwise: deterministic kernels, no TF32
    beta: float = 1.0  # weight of the KL in the loss only (beta-VAE); metrics use the true NELBO
    kl_warmup_epochs: int = 0  # the KL weight rises linearly from 0 to beta over this many epochs; 0 = off
    free_bits: float = 0.0  # floor on each level's KL in the loss, nats per example; 0 = off
    grad_clip: float | None = None  # clip the gradient norm to this; None = no clipping
    max_nonfinite_steps: int = 5  # non-finite steps in a row that trigger a roll-back
    max_rollbacks: int = 3  # roll-backs (to the last good epoch, lower lr) before giving up
    rollback_lr_factor: float = 0.5  # the learning rate is multiplied by this at each roll-back
    log_images: bool = True  # sample / reconstruction grids when validation improves,
    image_every: int = 5  # ... at most every this many epochs (and the best model's at the end)
    images: str = "mean"  # what the grids show of p(x|z): mean, or sample (a draw from it)
    progress: bool = True  # tqdm progress bars
    num_threads: int | None = None  # CPU threads torch may use; None = torch's default (all cores)
    ema: float | None = None  # decay d in (0, 1) of an EMA of the weights, which are evaluated; None = off
    profile_steps: int = 0  # torch.profiler trace of this many training steps into <run_dir>/profile
    overfit_check: bool = False  # log the training split's NELBO before and after fitting (debug=overfit)
    devices: int = 1  # training processes on this machine (DDP, one per GPU); under torchrun, torchrun's
    precision: str = "32"  # 32, bf16-mixed (CUDA and CPU) or 16-mixed (CUDA): the nets' autocast dtype


@dataclass
class EvalConfig:
    """Evaluation: every epoch's validation NELBO and the final test metrics of best.pt."""

    iw_samples: int = 1000  # k of the importance-weighted log-likelihood estimate
    nelbo_samples: int | None = None  # the test NELBO's draws: the first n of the IW-NLL's; None: all k
    batch_size: int = 1000  # examples per forward pass, in validation and in the final evaluation
    seed: int = 0  # seeds each stage of the final evaluation, as `vaekit evaluate --seed` does
    ais_chains: int = 100  # model=rbm: AIS chains of the test log Z (Salakhutdinov & Murray, 2008)
    ais_betas: int = 10000  # ... and its intermediate distributions, 0 and 1 included
    val_ais_chains: int = 16  # model=rbm: the validation NLL's short AIS, every epoch
    val_ais_betas: int = 1000


@dataclass
class DataConfig:
    """How the splits reach the device: resident there (the fast path) or the training split
    streamed from host memory by a DataLoader (for data larger than the device's memory)."""

    in_memory: bool | None = None  # None: resident when the training split fits max_device_bytes
    max_device_bytes: int = 4 * 2**30  # the training split's size as float32 on the device
    num_workers: int | None = None  # streaming's DataLoader workers; None: 0 on the CPU, 4 on a GPU
    limit_train: int | None = None  # train on the first N training examples only (debug presets)
    limit_eval: int | None = None  # validate and test on the first N examples of val and of test


@dataclass
class MlflowConfig:
    """Where `logger=mlflow` records runs (vaekit/loggers/mlflow.py)."""

    # None: $MLFLOW_TRACKING_URI if set, else sqlite:///outputs/mlflow.db (artifacts beside it,
    # in outputs/mlartifacts), relative to the working directory; or a server's http(s):// address
    tracking_uri: str | None = None
    experiment: str = "vaekit"  # created if it does not exist
    log_checkpoint: bool = True  # best.pt as an artifact when the run finishes (a copy of the file)


@dataclass
class LoggersConfig:
    """Settings of each logger; which ones run is the root key `logger`."""

    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class TrainConfig:
    """Root of `configs/train.yaml`."""

    dataset: Any = MISSING
    likelihood: Any = MISSING
    model: Any = MISSING
    prior: Any = MISSING
    posterior: Any = MISSING
    net: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None  # the lr schedule's plain settings (vaekit/training/schedule.py); None = none
    objective: Any = None  # the loss's plain settings (vaekit/objectives.py); None = the ELBO
    resume: str | None = None  # a run directory whose last.pt to continue from
    trust: list[str] = field(default_factory=list)  # module prefixes a resumed config may build from
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # tensorboard, mlflow, csv, or a list of them: logger=[tensorboard,mlflow] (a plain setting,
    # not a config group: Hydra picks one option per group, and this takes several)
    logger: Any = "tensorboard"
    loggers: LoggersConfig = field(default_factory=LoggersConfig)


def _last_size(sizes: Any) -> int:
    """`${vaekit_last:${.latent_dims}}`: the last entry of a list of sizes (0 if empty, which
    the prior then refuses), e.g. the top latent size of a hierarchical model. A single number
    passes through, so the model can refuse it in its own words."""
    if isinstance(sizes, (int, float, str)):
        return int(sizes)
    return int(sizes[-1]) if len(sizes) else 0


def register_schema() -> None:
    """Make `train_schema` available to the defaults list of `train.yaml`, and register the
    resolver `vaekit_last` that hierarchical model configs use for their top latent size."""
    from hydra.core.config_store import ConfigStore  # here: importing the schema registers nothing

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    OmegaConf.register_new_resolver("vaekit_last", _last_size, replace=True)


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved config saved by an earlier vaekit, in today's layout (a new dict).

    Earlier runs sized evaluation with `trainer.eval_batch_size` beside `eval.batch_size`, and
    kept the binarization seed on the Bernoulli likelihood; today both live in one place.
    Trainer and eval settings added since take their defaults.
    """
    config = copy.deepcopy(config)
    config.setdefault("logger", "tensorboard")  # runs from before vaekit had other loggers
    config.setdefault("objective", {"name": "elbo"})  # runs from before vaekit had other objectives
    sections = {
        "trainer": TrainerConfig(),
        "eval": EvalConfig(),
        "data": DataConfig(),
        "loggers": LoggersConfig(),
    }
    for key, settings in sections.items():
        node = config.setdefault(key, {})
        if isinstance(node, dict):
            for name, value in asdict(settings).items():
                node.setdefault(name, value)
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    old_batch = trainer.pop("eval_batch_size", None)
    evaluation = config.get("eval")
    if old_batch is not None and isinstance(evaluation, dict) and "batch_size" not in evaluation:
        evaluation["batch_size"] = old_batch
    likelihood, dataset = config.get("likelihood"), config.get("dataset")
    if isinstance(likelihood, dict) and "binarize_seed" in likelihood:
        seed = likelihood.pop("binarize_seed")
        if isinstance(dataset, dict):
            dataset.setdefault("binarize_seed", seed)
    return config
