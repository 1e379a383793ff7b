"""Config -> device, data and model: the one assembly, used by the commands, runs, tests and
scripts. Importing it registers nothing with Hydra (the `vaekit train` app lives in
vaekit/commands/train.py).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from omegaconf import DictConfig

from vaekit.data import DeviceData, RawSplits
from vaekit.errors import VaekitError
from vaekit.rng import MAX_SEED
from vaekit.training.rng_state import DEVICE_TYPES

log = logging.getLogger("vaekit")


@dataclass
class Built:
    """What `build` assembles from a config: the device, the uint8 splits, the model on the
    device, and the float splits beside it (binarized once where the likelihood asks)."""

    device: torch.device
    raw: RawSplits
    model: torch.nn.Module
    data: DeviceData


def resolve_device(name: str, option: str = "trainer.device") -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else must be usable here.

    `option` names the setting in error messages (trainer.device=..., or --device ...).
    """
    said = f"{option}={name}" if option.startswith("trainer") else f"{option} {name}"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise VaekitError(f"{said} is not a device name (try auto, cpu or cuda).") from error
    if device.type not in DEVICE_TYPES:
        raise VaekitError(f"{said} is not a device vaekit runs on (try auto, cpu or cuda).")
    if device.type == "cpu" and device.index not in (None, 0):
        raise VaekitError(f"{said} names a CPU index; there is one CPU device: use cpu.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VaekitError(f"{said} was asked for, but no CUDA GPU is available here.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise VaekitError(f"{said} was asked for, but this machine has {torch.cuda.device_count()} GPU(s).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise VaekitError(f"{said} was asked for, but MPS is not available here.")
    return device


# Bytes per parameter that training needs: weights, gradient and the optimizer's two moments
# (Adam, Adamax), float32 each.
TRAINING_BYTES_PER_PARAMETER = 4 * 4


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (the GPU's, or Linux's MemAvailable); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            fields_kb = dict(line.split(":", 1) for line in handle)
        return int(fields_kb["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def parameter_count(cfg: DictConfig, raw: RawSplits) -> int | None:
    """The model's trainable parameters, counted on torch's meta device (no memory, no random
    draws); None when some part cannot be built there."""
    from vaekit.rng import own_rng

    try:
        with own_rng(), torch.device("meta"):
            model = build_model(cfg, raw)
    except Exception:  # an estimate only: the real build reports its own errors
        return None
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_memory(cfg: DictConfig, raw: RawSplits, device: torch.device) -> None:
    """Refuse, with the estimate, a model whose weights, gradients and optimizer state would
    not fit in the memory free on its device, before building it (instead of swapping for
    minutes and dying in the allocator)."""
    count, free = parameter_count(cfg, raw), free_memory(device)
    if count is None or free is None:
        return
    needed = count * TRAINING_BYTES_PER_PARAMETER
    if needed > free:
        raise VaekitError(
            f"The model has {count:,} parameters; training them needs about {needed / 2**30:.1f} GiB "
            f"on {device}, which has {free / 2**30:.1f} GiB free: make the model smaller "
            f"(model.latent_dim, net.hidden_dim, ...)."
        )


def check_settings(cfg: DictConfig) -> None:
    """Keys and values the schema's types cannot rule out: one sentence for the first bad one."""
    from vaekit.schema import DataConfig, EvalConfig, TrainConfig, TrainerConfig

    for prefix, node, schema in (
        ("", cfg, TrainConfig),
        ("trainer.", cfg.trainer, TrainerConfig),
        ("eval.", cfg.eval, EvalConfig),
        ("data.", cfg.data, DataConfig),
    ):
        unknown = sorted(set(node.keys()) - {f.name for f in fields(schema)})
        if unknown:
            key = f"{prefix}{unknown[0]}"
            raise VaekitError(
                f"{key} is not a vaekit setting (added with +{key}=...?): "
                f"`vaekit train --help` lists the groups and settings."
            )
    t, e = cfg.trainer, cfg.eval
    finite = math.isfinite
    rules = [
        (t.max_epochs >= 1, f"trainer.max_epochs must be at least 1, not {t.max_epochs}."),
        (t.images in ("mean", "sample"), f"trainer.images must be mean or sample, not {t.images}."),
        (t.patience >= 0, f"trainer.patience must be 0 or more, not {t.patience}."),
        (
            finite(t.min_delta) and t.min_delta >= 0,
            f"trainer.min_delta must be a finite number, 0 or more, not {t.min_delta}.",
        ),
        (0 <= t.seed <= MAX_SEED, f"trainer.seed must be between 0 and 2**63 - 1, not {t.seed}."),
        (0 <= e.seed <= MAX_SEED, f"eval.seed must be between 0 and 2**63 - 1, not {e.seed}."),
        (
            finite(t.free_bits) and t.free_bits >= 0,
            f"trainer.free_bits must be 0 or more, not {t.free_bits}.",
        ),
        (finite(t.beta) and t.beta >= 0, f"trainer.beta must be a finite number, 0 or more, not {t.beta}."),
        (t.kl_warmup_epochs >= 0, f"trainer.kl_warmup_epochs must be 0 or more, not {t.kl_warmup_epochs}."),
        (t.max_rollbacks >= 0, f"trainer.max_rollbacks must be 0 or more, not {t.max_rollbacks}."),
        (
            finite(t.rollback_lr_factor) and 0 < t.rollback_lr_factor <= 1,
            f"trainer.rollback_lr_factor must be in (0, 1], not {t.rollback_lr_factor}.",
        ),
        (t.image_every >= 1, f"trainer.image_every must be at least 1, not {t.image_every}."),
        (t.batch_size >= 1, f"trainer.batch_size must be at least 1, not {t.batch_size}."),
        (t.max_nonfinite_steps >= 1, "trainer.max_nonfinite_steps must be at least 1."),
        (
            t.grad_clip is None or (finite(t.grad_clip) and t.grad_clip > 0),
            f"trainer.grad_clip must be a positive number (or null), not {t.grad_clip}.",
        ),
        (t.num_threads is None or t.num_threads >= 1, "trainer.num_threads must be at least 1 (or null)."),
        (e.iw_samples >= 1, f"eval.iw_samples must be at least 1, not {e.iw_samples}."),
        (
            e.nelbo_samples is None or e.nelbo_samples >= 1,
            f"eval.nelbo_samples must be at least 1 (or null: all k draws), not {e.nelbo_samples}.",
        ),
        (e.batch_size >= 1, f"eval.batch_size must be at least 1, not {e.batch_size}."),
        *(
            (e[key] >= least, f"eval.{key} must be at least {least}, not {e[key]}.")
            for key, least in AIS_MINIMUMS.items()
        ),
        *limit_rules(cfg.data),
        (
            t.ema is None or (finite(t.ema) and 0 < t.ema < 1),
            f"trainer.ema must be a decay in (0, 1), e.g. 0.999 (or null: off), not {t.ema}.",
        ),
        (t.profile_steps >= 0, f"trainer.profile_steps must be 0 or more, not {t.profile_steps}."),
        (t.devices >= 1, f"trainer.devices must be at least 1, not {t.devices}."),
        (
            t.precision in ("32", "bf16-mixed", "16-mixed"),
            f"trainer.precision must be 32, bf16-mixed or 16-mixed, not {t.precision}.",
        ),
    ]
    for ok, message in rules:
        if not ok:
            raise VaekitError(message)
    from vaekit.training.schedule import build_schedule

    build_schedule(cfg.get("scheduler"))  # the schedule checks its own settings, before anything is built
    from vaekit.objectives import build_objective

    objective = build_objective(cfg.get("objective"))  # its own settings, and how they combine
    if objective.name == "iwae" and t.free_bits > 0:
        raise VaekitError(
            "trainer.free_bits floors each level's KL of the ELBO, which objective=iwae does not have: "
            "set trainer.free_bits=0 or use objective=elbo."
        )


def instantiate_group(node: DictConfig, group: str, **kwargs: Any) -> Any:
    """instantiate() one config group option; errors become one VaekitError sentence."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, VaekitError):
            raise error.__cause__ from None
        raise VaekitError(f"Could not build the {group} from its config: {_cause_of(error)}.") from error


def _cause_of(error: Exception) -> str:
    """What went wrong inside instantiate(), in one line: the underlying exception when there is
    one (Hydra's own message only says which target failed)."""
    cause = error.__cause__
    if cause is not None:
        text = " ".join(str(cause).split()) or type(cause).__name__
        return f"{type(cause).__name__}: {text}".rstrip(".")
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("full_key:")]
    return " ".join(lines).rstrip(".")


def limit_rules(feed: Any) -> list[tuple[bool, str]]:
    """data.limit_train and data.limit_eval: null, or a positive number of examples."""
    return [
        (
            feed.get(key) is None or feed.get(key) >= 1,
            f"data.{key} must be at least 1 (or null: the whole split), not {feed.get(key)}.",
        )
        for key in ("limit_train", "limit_eval")
    ]


def build_dataset(cfg: DictConfig) -> RawSplits:
    """The dataset group's splits (uint8, on the CPU, checked at load), cut to their first
    data.limit_train / data.limit_eval examples when those are set: here, before any checksum
    is taken, so resume, evaluate and sample see the splits the run was trained on."""
    from vaekit.data.splits import first_examples

    raw = instantiate_group(cfg.dataset, "dataset")
    feed = cfg.get("data")
    if feed is None:
        return raw
    for ok, message in limit_rules(feed):  # evaluate and sample build data without check_settings
        if not ok:
            raise VaekitError(message)
    return first_examples(raw, feed.get("limit_train"), feed.get("limit_eval"))


RBM_TARGET = "vaekit.image_rbm.ImageRBM"
AIS_MINIMUMS = {"ais_chains": 1, "ais_betas": 2, "val_ais_chains": 1, "val_ais_betas": 2}  # chains, 0 and 1
# the groups a model=rbm does not use, with their defaults (which it accepts, unused)
VAE_ONLY_GROUPS = {"prior": "standard", "posterior": "gaussian", "net": "mlp", "objective": "elbo"}


def is_rbm(cfg: DictConfig) -> bool:
    """Whether the config's model is model=rbm (`vaekit.image_rbm.ImageRBM`)."""
    return cfg.model.get("_target_") == RBM_TARGET


EBM_TARGET = "vaekit.ebm.EnergyModel"
# the groups a model=ebm does not use, with their defaults (which it accepts, unused); it uses net
EBM_UNUSED_GROUPS = {"prior": "standard", "posterior": "gaussian", "objective": "elbo"}


def is_ebm(cfg: DictConfig) -> bool:
    """Whether the config's model is model=ebm (`vaekit.ebm.EnergyModel`)."""
    return cfg.model.get("_target_") == EBM_TARGET


def scored_by_ais(cfg: DictConfig) -> bool:
    """Whether the model's test NLL comes from AIS (model=rbm, model=ebm), not importance weights."""
    return is_rbm(cfg) or is_ebm(cfg)


def overridden_groups(overrides: Sequence[str]) -> dict[str, str]:
    """Command-line overrides as {key: 'key=value'}: 'likelihood=gaussian' and '+likelihood.std=1'
    give the keys 'likelihood' and 'likelihood.std'."""
    keys = {}
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
        keys[key] = override.lstrip("+~")
    return keys


def check_ebm_choices(cfg: DictConfig, choices: Any, overrides: Sequence[str] = ()) -> None:
    """Refuse, in one sentence, what model=ebm does not have (a prior, posterior, objective or
    likelihood choice, a KL weight, several processes, mixed precision, the NELBO overfit check) and
    a bad sampler setting (sgld_steps, a buffer smaller than a batch, reinit_prob)."""
    from vaekit.ebm import check_sampler_settings

    for group, default in EBM_UNUSED_GROUPS.items():
        chosen = choices.get(group) if choices else None
        if chosen is not None and chosen != default:
            raise VaekitError(f"model=ebm has no {group} to choose: drop {group}={chosen}.")
    for key, override in overridden_groups(overrides).items():
        if key == "likelihood" or key.startswith("likelihood."):
            raise VaekitError(
                f"model=ebm has no likelihood to choose (it models the dequantized pixel levels): drop "
                f"{override}."
            )
    t, m = cfg.trainer, cfg.model
    hidden_dim = cfg.net.get("hidden_dim") if cfg.get("net") is not None else None
    if m.get("latent_dim") is not None and hidden_dim is not None and m.latent_dim != hidden_dim:
        raise VaekitError(
            f"model=ebm has no latent code; its feature size is net.hidden_dim: drop "
            f"model.latent_dim={m.latent_dim}, or set net.hidden_dim={m.latent_dim}."
        )
    for key, default in (("beta", 1.0), ("free_bits", 0.0), ("kl_warmup_epochs", 0)):
        if t[key] != default:
            raise VaekitError(f"trainer.{key} weights a KL term, which model=ebm does not have: drop it.")
    if t.devices > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise VaekitError(
            "model=ebm trains in one process (its replay buffer is not shared): use trainer.devices=1."
        )
    if t.precision != "32":
        raise VaekitError(f"model=ebm computes in float32: drop trainer.precision={t.precision}.")
    if t.overfit_check:
        raise VaekitError("trainer.overfit_check measures a NELBO, which model=ebm does not have: drop it.")
    if cfg.get("net") is not None and cfg.net.get("norm") == "batch":
        raise VaekitError(
            "model=ebm needs an energy without batch statistics (its Langevin chains would change them): "
            "use net.norm=group or none."
        )
    check_sampler_settings(m.get("sgld_steps", 1), m.get("buffer_size", t.batch_size),
                           m.get("reinit_prob", 0.0), t.batch_size)  # fmt: skip


def check_model_choices(cfg: DictConfig, choices: Any, overrides: Sequence[str] = ()) -> None:
    """Refuse, in one sentence, a VAE-only group or setting chosen beside model=rbm or model=ebm
    (`choices`: Hydra's group -> option of the run; `overrides`: the command line's, where an EBM's
    refused likelihood choice shows, since the dataset picks one by default)."""
    if is_ebm(cfg):
        check_ebm_choices(cfg, choices, overrides)
        return
    if not is_rbm(cfg):
        return
    for group, default in VAE_ONLY_GROUPS.items():
        chosen = choices.get(group) if choices else None
        if chosen is not None and chosen != default:
            raise VaekitError(f"model=rbm has no {group} to choose: drop {group}={chosen}.")
    t = cfg.trainer
    for key, default in (("beta", 1.0), ("free_bits", 0.0), ("kl_warmup_epochs", 0)):
        if t[key] != default:
            raise VaekitError(f"trainer.{key} weights a KL term, which model=rbm does not have: drop it.")
    if t.devices > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise VaekitError(
            "model=rbm trains in one process (its persistent chains are not shared): use trainer.devices=1."
        )
    if t.precision != "32":
        raise VaekitError(f"model=rbm computes in float32: drop trainer.precision={t.precision}.")


def build_model(cfg: DictConfig, raw: RawSplits) -> torch.nn.Module:
    """Model from the model, net, prior, posterior and likelihood groups, for this dataset."""
    if is_ebm(cfg):  # the energy from the net group; no likelihood: the integer levels, dequantized
        train = raw.train if isinstance(raw, RawSplits) else None  # None: the checkpoint's buffers follow
        return instantiate_group(cfg.model, "model", data_shape=raw.shape, num_levels=raw.num_levels,
                                 net=instantiate_group(cfg.net, "net"), train=train)  # fmt: skip
    likelihood = instantiate_group(cfg.likelihood, "likelihood")
    likelihood.check_dataset(raw.num_levels, raw.shape)
    if is_rbm(cfg):  # no net, prior or posterior: the training split sets its data statistics
        train = raw.train if isinstance(raw, RawSplits) else None  # None: the checkpoint's buffers follow
        extra = {"data_shape": raw.shape, "likelihood": likelihood, "num_levels": raw.num_levels}
        return instantiate_group(cfg.model, "model", train=train, **extra)
    # model.conditional=true: the number of classes C comes from the data's labels 0..C-1
    labels = {"num_classes": class_count(raw)} if cfg.model.get("conditional") else {}
    return instantiate_group(
        cfg.model,
        "model",
        data_shape=raw.shape,
        net=instantiate_group(cfg.net, "net"),
        prior=instantiate_group(cfg.prior, "prior"),
        make_posterior=instantiate_group(cfg.posterior, "posterior", _partial_=True),
        likelihood=likelihood,
        **labels,
    )


def class_count(raw: Any) -> int:
    """The number of classes C of a labelled dataset (its largest label over the splits, plus 1),
    for model.conditional=true; refuses, in one sentence naming the dataset, data without labels:
    an image labelled -1 (outside every class folder) or a training split of one class only."""
    if not isinstance(raw, RawSplits):  # a shape declared by a saved config: no labels to read
        raise VaekitError("model.conditional=true needs the dataset's labels: load the run with its data.")
    from vaekit.data.splits import SPLIT_NAMES

    lowest = min(int(raw.labels(split).min()) for split in SPLIT_NAMES)
    if lowest < 0:
        raise VaekitError(
            f"model.conditional=true needs a label for every image, but some images of {raw.name} have "
            f"none (label {lowest}, as files outside the class folders get): label them, or set "
            f"model.conditional=false."
        )
    if torch.unique(raw.train_labels).numel() < 2:
        raise VaekitError(
            f"model.conditional=true needs labelled data, but {raw.name} has no labels (every training "
            f"image has label {int(raw.train_labels[0])}, as in an image folder without class folders): "
            f"use a labelled dataset, or set model.conditional=false."
        )
    return max(int(raw.labels(split).max()) for split in SPLIT_NAMES) + 1


def device_data(
    raw: RawSplits, model: torch.nn.Module, device: torch.device, feed: Any = None
) -> DeviceData:
    """The splits for the device, binarized when the model's likelihood is Bernoulli: all resident
    there, or the training split streamed from host memory when `feed` (the `data` settings)
    says so or the split would take more than `feed.max_device_bytes` there (logged)."""
    from vaekit.schema import DataConfig

    feed = feed if feed is not None else DataConfig()
    binarize = model.likelihood.binary_data
    train_bytes = raw.train.numel() * 4  # float32 on the device
    stream = not feed.in_memory if feed.in_memory is not None else train_bytes > feed.max_device_bytes
    if not stream:
        return DeviceData(raw, device, binarize)
    from vaekit.data.stream import StreamedData

    workers = feed.num_workers if feed.num_workers is not None else (0 if device.type == "cpu" else 4)
    limit = f"more than data.max_device_bytes={feed.max_device_bytes}"
    why = "data.in_memory=false" if feed.in_memory is False else limit
    gib = train_bytes / 2**30
    log.info("streaming the training split from host memory (%.2f GiB as floats: %s)", gib, why)
    return StreamedData(raw, device, binarize, workers)


def build(cfg: DictConfig, device: torch.device, check_fits: bool = False) -> Built:
    """Dataset, model (on `device`) and device-resident data of a config, in that order, so the
    model's initial weights follow the global seed set before the call. With `check_fits`, a
    model too large to train in the device's free memory is refused before it is built."""
    raw = build_dataset(cfg)
    if check_fits:
        check_memory(cfg, raw, device)
    model = build_model(cfg, raw).to(device)
    return Built(device, raw, model, device_data(raw, model, device, cfg.get("data")))
