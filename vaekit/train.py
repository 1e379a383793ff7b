"""`vaekit train`: assemble data, model and optimizer from the config, fit, evaluate.

train(cfg, run_dir) does the work and returns the final metrics; `hydra_main` is the thin
Hydra wrapper that the CLI calls.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vaekit.checkpoint import load_checkpoint
from vaekit.data import DeviceData, RawSplits
from vaekit.errors import RunStopped, VaekitError
from vaekit.flatten import FlatParameters
from vaekit.latents import posterior_means
from vaekit.metrics import active_units, bits_per_dim, iw_nll, nelbo_terms
from vaekit.resume import register_resolvers, resumed_config
from vaekit.schema import register_schema
from vaekit.signals import StopRequest

log = logging.getLogger("vaekit")

PACKAGE_CONFIGS = Path(__file__).parent / "configs"  # inside an installed wheel
SOURCE_CONFIGS = Path(__file__).parent.parent / "configs"  # in a source checkout
CONFIG_DIR = PACKAGE_CONFIGS if PACKAGE_CONFIGS.is_dir() else SOURCE_CONFIGS

FAILED_JOBS: list[str] = []  # sweep jobs that failed, reported by the CLI at the end


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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VaekitError(f"{said} was asked for, but no CUDA GPU is available here.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise VaekitError(f"{said} was asked for, but MPS is not available here.")
    return device


def check_settings(cfg: DictConfig) -> None:
    """Values the schema's types cannot rule out: one sentence for the first bad one."""
    t, e = cfg.trainer, cfg.eval
    rules = [
        (t.max_epochs >= 1, f"trainer.max_epochs must be at least 1, not {t.max_epochs}."),
        (t.patience >= 0, f"trainer.patience must be 0 or more, not {t.patience}."),
        (t.min_delta >= 0, f"trainer.min_delta must be 0 or more, not {t.min_delta}."),
        (t.batch_size >= 1, f"trainer.batch_size must be at least 1, not {t.batch_size}."),
        (t.eval_batch_size >= 1, f"trainer.eval_batch_size must be at least 1, not {t.eval_batch_size}."),
        (t.max_nonfinite_steps >= 1, "trainer.max_nonfinite_steps must be at least 1."),
        (t.grad_clip is None or t.grad_clip > 0, "trainer.grad_clip must be positive (or null)."),
        (t.num_threads is None or t.num_threads >= 1, "trainer.num_threads must be at least 1 (or null)."),
        (e.iw_samples >= 1, f"eval.iw_samples must be at least 1, not {e.iw_samples}."),
        (e.nelbo_samples >= 1, f"eval.nelbo_samples must be at least 1, not {e.nelbo_samples}."),
        (e.batch_size >= 1, f"eval.batch_size must be at least 1, not {e.batch_size}."),
    ]
    for ok, message in rules:
        if not ok:
            raise VaekitError(message)


def build(node: DictConfig, group: str, **kwargs: Any) -> Any:
    """instantiate() one config group option; errors become one VaekitError sentence."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, VaekitError):
            raise error.__cause__ from None
        first_line = str(error).strip().splitlines()[0]
        raise VaekitError(f"Could not build the {group} from its config: {first_line}") from error


def build_model(cfg: DictConfig, raw: RawSplits) -> torch.nn.Module:
    """Model from the model, net, prior, posterior and likelihood groups, for this dataset."""
    likelihood = build(cfg.likelihood, "likelihood")
    likelihood.check_dataset(raw.num_levels)
    return build(
        cfg.model,
        "model",
        data_shape=raw.shape,
        net=build(cfg.net, "net"),
        prior=build(cfg.prior, "prior"),
        make_posterior=build(cfg.posterior, "posterior", _partial_=True),
        likelihood=likelihood,
    )


def evaluate_test(
    model: torch.nn.Module, data: DeviceData, cfg: DictConfig, means: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Test NELBO terms, importance-weighted NLL, bits/dim and active units per level
    (from the test posterior means `means`) of the model as it is."""
    model.eval()
    terms = nelbo_terms(model, data.test, cfg.trainer.eval_batch_size, cfg.eval.nelbo_samples)
    nll = iw_nll(model, data.test, cfg.eval.iw_samples, cfg.eval.batch_size, cfg.trainer.progress)
    metrics = {f"test_{name.replace('/', '_')}": value for name, value in terms.items()}
    metrics.update(test_iw_nll=nll, test_bpd=bits_per_dim(nll, data.num_dims))
    if means:
        counts = active_units(means)
        metrics.update({f"test_active_units_{level}": n for level, n in counts.items()})
    return metrics


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file, then os.replace); non-finite numbers become null."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in payload.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    """Flat settings shown in TensorBoard's HPARAMS tab."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    flat = {
        group: choices.get(group, "")
        for group in ("model", "prior", "posterior", "dataset", "likelihood", "net", "optimizer")
    }
    flat.update(latent_dim=cfg.model.get("latent_dim", 0), lr=cfg.optimizer.get("lr", 0.0))
    flat.update(batch_size=cfg.trainer.batch_size, seed=cfg.trainer.seed)
    return flat


def fit_fields(state: Any, cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """The metrics.json fields that describe the fit itself."""
    return {
        "best_epoch": state.best_epoch,
        "epochs": state.epoch,
        "train_seconds": state.train_seconds,
        "seconds_per_epoch": state.train_seconds / max(state.epoch, 1),
        "val_nelbo": state.best_val,
        "nonfinite_steps": state.nonfinite_total,
        "rollbacks": state.rollbacks,
        "status": state.status,
        "device": str(device),
        "iw_samples": cfg.eval.iw_samples,
        "nelbo_samples": cfg.eval.nelbo_samples,
    }


def train(cfg: DictConfig, run_dir: Path, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit the configured model (continuing `checkpoint` if given), evaluate its best
    checkpoint on the test split, write metrics.json and return the metrics.

    Raises RunStopped (metrics.json already written) when interrupted or diverged.
    """
    from vaekit.tb_logger import RunLogger  # deferred: tensorboard import is slow-ish
    from vaekit.trainer import Diverged, Interrupted, Trainer

    check_settings(cfg)
    if cfg.trainer.num_threads is not None:  # e.g. 1 per job when several share a CPU
        torch.set_num_threads(cfg.trainer.num_threads)
    device = resolve_device(cfg.trainer.device)
    torch.manual_seed(cfg.trainer.seed)
    raw: RawSplits = build(cfg.dataset, "dataset")
    if cfg.trainer.batch_size > raw.train.shape[0]:
        raise VaekitError(
            f"trainer.batch_size={cfg.trainer.batch_size} is larger than the training split "
            f"({raw.train.shape[0]} examples)."
        )
    model = build_model(cfg, raw).to(device)
    lik = model.likelihood
    data = DeviceData(raw, device, lik.binary_data, getattr(lik, "binarize_seed", 0))
    model.prior.initialize_from_data(data.train)
    flat = FlatParameters(model)  # the optimizer sees one tensor: few kernels per step
    optimizer = build(cfg.optimizer, "optimizer", params=[flat.param])
    # on resume, TensorBoard hides what an interrupted run logged after its last checkpoint
    resumed_epoch = checkpoint["fit_state"]["epoch"] if checkpoint else None
    logger = RunLogger(run_dir, purge_step=None if resumed_epoch is None else resumed_epoch + 1)
    config = OmegaConf.to_container(cfg, resolve=True)
    if config["dataset"].get("root"):  # so evaluate/sample/resume find the data from anywhere
        config["dataset"]["root"] = str(Path(config["dataset"]["root"]).expanduser().resolve())
    trainer = Trainer(model, flat, optimizer, data, cfg.trainer, run_dir, logger, config)
    if checkpoint is not None:
        trainer.restore(checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    verb = f"resuming at epoch {resumed_epoch}:" if checkpoint else "training"
    where = f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)
    log.info(
        "%s %s on %s (%d parameters) on %s; run directory %s",
        verb,
        type(model).__name__,
        raw.name,
        n_params,
        where,
        run_dir,
    )
    try:
        with StopRequest() as stop:
            trainer.stop = stop
            state = trainer.fit()
    except Interrupted as stopped:
        record = {**fit_fields(trainer.state, cfg, device), "reason": str(stopped)}
        write_json(run_dir / "metrics.json", record)
        logger.close()
        raise RunStopped(f"{stopped}; resume with: vaekit train resume={run_dir}", stop.exit_code) from None
    except Diverged as diverged:
        record = {**fit_fields(trainer.state, cfg, device), "reason": str(diverged)}
        if trainer.state.best_epoch > 0:  # the best model from before the divergence
            record.update(evaluate_best(trainer, cfg, device))
        write_json(run_dir / "metrics.json", record)
        logger.close()
        raise RunStopped(str(diverged)) from None
    metrics = {**evaluate_best(trainer, cfg, device), **fit_fields(state, cfg, device)}
    write_json(run_dir / "metrics.json", metrics)
    logger.hparams(hparams_of(cfg), {k: metrics[k] for k in ("test_nelbo", "test_iw_nll", "test_bpd")})
    logger.close()
    return metrics


def evaluate_best(trainer: Any, cfg: DictConfig, device: torch.device) -> dict[str, float]:
    """Load best.pt into the trainer's model, log its image grids and the test latent means
    (TensorBoard Projector), and evaluate it on the test split."""
    model, data, step = trainer.model, trainer.data, trainer.state.best_epoch
    model.load_state_dict(load_checkpoint(trainer.run_dir / "best.pt", device)["model"])
    model.eval()
    means = posterior_means(model, data.test, cfg.trainer.eval_batch_size)
    if cfg.trainer.log_images:
        trainer.log_images(step)  # the grids of the model that is evaluated
        for level, mean in means.items():
            tag = "latent_means" if len(means) == 1 else f"latent_means_{level}"
            trainer.logger.embedding(mean, data.test_labels, data.test, step, tag=tag)
    return evaluate_test(model, data, cfg, means)


def summary_line(metrics: dict[str, Any], run_dir: Path) -> str:
    """The one line printed at the end of a run."""
    return (
        f"test NELBO {metrics['test_nelbo']:.2f} | IW-NLL (k={metrics['iw_samples']}) "
        f"{metrics['test_iw_nll']:.2f} | bits/dim {metrics['test_bpd']:.4f} | "
        f"best epoch {metrics['best_epoch']}/{metrics['epochs']} ({metrics['status']}) | "
        f"{metrics['train_seconds']:.1f} s | run: {run_dir}"
    )


def _report_failure(run_dir: Path, error: BaseException, started: float, record: bool = True) -> None:
    """Print the one-sentence error; with `record`, metrics.json says the run failed and why."""
    reason = str(error) if isinstance(error, VaekitError) else f"{type(error).__name__}: {error}"
    if record:
        failure = {"status": "failed", "reason": reason, "seconds": time.time() - started}
        write_json(run_dir / "metrics.json", failure)
    print(f"vaekit: error: {reason}", file=sys.stderr, flush=True)


register_schema()
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra entry point of `vaekit train`; returns the test IW-NLL (for sweepers)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    started = time.time()
    started_training = False  # a refused resume must not overwrite the run's metrics.json
    try:
        checkpoint = None
        if cfg.resume:
            if multirun:
                raise VaekitError("resume continues one run at a time: drop -m/--multirun.")
            cfg, checkpoint = resumed_config(cfg, list(hydra_cfg.overrides.task))
        started_training = True
        metrics = train(cfg, run_dir, checkpoint)
    except RunStopped as stopped:  # interrupted or diverged: metrics.json says so already
        print(f"vaekit: {stopped}", file=sys.stderr, flush=True)
        if not multirun or stopped.exit_code != 1:
            sys.exit(stopped.exit_code)  # an interrupt also stops the rest of a sweep
        FAILED_JOBS.append(f"job {hydra_cfg.job.num} ({run_dir}): {stopped}")
        return None
    except KeyboardInterrupt:  # the second Ctrl-C: no step finished, last.pt is the last epoch's
        print(
            f"\nvaekit: stopped at once; resume from the last completed epoch with: "
            f"vaekit train resume={run_dir}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(130)
    except Exception as error:
        run_dir.mkdir(parents=True, exist_ok=True)
        _report_failure(run_dir, error, started, record=started_training or not cfg.resume)
        full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
        if full_error or (not multirun and not isinstance(error, VaekitError)):
            raise  # a bug, not bad input (or asked for): Hydra shows where it happened
        if not multirun:
            sys.exit(1)
        FAILED_JOBS.append(f"job {hydra_cfg.job.num} ({run_dir}): {error}")
        return None
    print(summary_line(metrics, run_dir), flush=True)
    value = metrics["test_iw_nll"]
    return value if math.isfinite(value) else None
