"""`vaekit train`: compose the config, build data and model, fit, evaluate, write metrics.json.

train(cfg, run_dir) does the work and returns the final metrics; `hydra_main` is the thin
Hydra wrapper that the CLI calls. Importing this module registers the schema and resolvers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vaekit.build import (
    build,
    check_model_choices,
    check_settings,
    instantiate_group,
    resolve_device,
    scored_by_ais,
)
from vaekit.commands.rerun import find_rerun
from vaekit.commands.threads import set_job_threads
from vaekit.data import DeviceData
from vaekit.data.memory import changed_splits
from vaekit.errors import RunStopped, VaekitError, describe_os_error
from vaekit.evaluation.metrics import check_budget, evaluate_model
from vaekit.loggers.select import check_loggers, make_logger
from vaekit.objectives import build_objective, objective_for
from vaekit.runs import write_json
from vaekit.schema import register_schema
from vaekit.training import distributed
from vaekit.training.checkpoint import load_checkpoint
from vaekit.training.determinism import make_deterministic
from vaekit.training.distributed import SilentLogger
from vaekit.training.flatten import FlatParameters
from vaekit.training.lock import RunLock
from vaekit.training.overfit import OverfitCheck
from vaekit.training.precision import check_precision
from vaekit.training.resume import register_resolvers, resumed_config
from vaekit.training.schedule import build_schedule
from vaekit.training.signals import StopRequest
from vaekit.trust import check_trusted

log = logging.getLogger("vaekit")

PACKAGE_CONFIGS = Path(__file__).parent.parent / "configs"  # inside an installed wheel
SOURCE_CONFIGS = Path(__file__).parent.parent.parent / "configs"  # in a source checkout
CONFIG_DIR = PACKAGE_CONFIGS if PACKAGE_CONFIGS.is_dir() else SOURCE_CONFIGS
RESUME_FAILURE = "resume_failed.json"  # a resume's failure, beside the run's metrics.json
HPARAM_GROUPS = ("model", "prior", "posterior", "dataset", "likelihood", "net", "optimizer", "scheduler")


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    """Flat settings shown in TensorBoard's HPARAMS tab."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    flat = {group: choices.get(group, "") for group in HPARAM_GROUPS}
    flat.update(latent_dim=cfg.model.get("latent_dim", 0), lr=cfg.optimizer.get("lr", 0.0))
    flat.update(batch_size=cfg.trainer.batch_size, seed=cfg.trainer.seed)
    return flat


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of metrics.json (test_nelbo, test_iw_nll, test_bpd, best_epoch, ...) that
    the loggers record at the end."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def fit_fields(state: Any, cfg: DictConfig, data: DeviceData) -> dict[str, Any]:
    """The metrics.json fields that describe the fit itself, and the checksums of the data it
    was trained and scored on (`vaekit report` ranks only runs of one test set)."""
    # nelbo, iwae for objective=iwae, nll (a short AIS) for model=rbm and model=ebm
    watched = "nll" if scored_by_ais(cfg) else build_objective(cfg.get("objective")).stopping_key
    return {
        "best_epoch": state.best_epoch,
        "epochs": state.epoch,
        "train_seconds": state.train_seconds,
        "seconds_per_epoch": state.train_seconds / max(state.epoch, 1),
        f"val_{watched}": state.best_val,  # the best validation number early stopping watched
        "stopped_on": watched,
        "nonfinite_steps": state.nonfinite_total,
        "rollbacks": state.rollbacks,
        "status": state.status,
        "device": str(data.device),
        "processes": distributed.current().size,  # DDP: how many trained the run (this session)
        "iw_samples": None if scored_by_ais(cfg) else cfg.eval.iw_samples,  # RBM, EBM: AIS (test_ais_*)
        "nelbo_samples": None if scored_by_ais(cfg) else cfg.eval.nelbo_samples or cfg.eval.iw_samples,
        "data_checksums": dict(data.checksums),
        # model.conditional=true: the test NELBO and IW-NLL are of log p(x|y), not comparable with log p(x)
        **({"conditional": True} if cfg.model.get("conditional") else {}),
    }


def saved_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data for checkpoints; dataset.root made absolute, so
    evaluate, sample and resume find the data from any working directory."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if config["dataset"].get("root"):
        config["dataset"]["root"] = str(Path(config["dataset"]["root"]).expanduser().resolve())
    return config


def train(
    cfg: DictConfig,
    run_dir: Path,
    checkpoint: dict[str, Any] | None = None,
    on_fit_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Fit the configured model (continuing `checkpoint` if given), evaluate its best
    checkpoint on the test split, write metrics.json and return the metrics. `on_fit_start`
    is called once everything is built and checked, just before the first step.

    Raises RunStopped (metrics.json already written) when interrupted or diverged.
    """
    check_settings(cfg)
    check_loggers(cfg)  # an unknown logger, or mlflow not installed: refused before anything is built
    if cfg.trainer.num_threads is not None:  # e.g. 1 per job when several share a CPU
        torch.set_num_threads(cfg.trainer.num_threads)
    device = distributed.rank_device(resolve_device(cfg.trainer.device))  # several processes: this one's GPU
    distributed.check_devices(cfg.trainer.devices, device)
    check_precision(cfg.trainer.precision, device)
    world = distributed.current()
    if cfg.trainer.deterministic:
        make_deterministic()
    torch.manual_seed(cfg.trainer.seed)
    built = build(cfg, device, check_fits=True)
    model, data = built.model, built.data
    if cfg.trainer.batch_size > built.raw.train.shape[0]:
        raise VaekitError(
            f"trainer.batch_size={cfg.trainer.batch_size} is larger than the training split "
            f"({built.raw.train.shape[0]} examples)."
        )
    sizes = {"train": built.raw.train.shape[0], "val": data.val.shape[0], "test": data.test.shape[0]}
    distributed.check_world(cfg, model, sizes)  # a batch that several processes cannot share evenly
    check_budget(data.test.shape[0], cfg.eval.iw_samples, "eval.iw_samples")  # refused now, not after fitting
    check_budget(data.test.shape[0], cfg.eval.nelbo_samples, "eval.nelbo_samples")
    if checkpoint is not None:
        check_same_data(checkpoint, data, Path(cfg.resume) / "last.pt")
    if hasattr(model, "prior"):  # model=rbm has none
        model.prior.initialize_from_data(data.train)
    flat = FlatParameters(model)  # the optimizer sees one tensor: few kernels per step
    world.broadcast_model(model)  # several processes start from rank 0's weights
    optimizer = instantiate_group(cfg.optimizer, "optimizer", params=[flat.param])
    # on resume, each logger continues its record without what an interrupted run logged
    # after its last checkpoint
    resumed_epoch = checkpoint["fit_state"]["epoch"] if checkpoint else None
    logger = make_logger(cfg, run_dir, resumed_epoch, saved_config(cfg)) if world.is_main else SilentLogger()
    try:
        return fit_and_evaluate(cfg, run_dir, checkpoint, on_fit_start, built, flat, optimizer, logger)
    except RunStopped:
        raise  # metrics.json says why; the loggers are closed
    except BaseException:
        logger.close()  # a crash: each logger records the run as ended, not as still running
        raise


def fit_and_evaluate(
    cfg: DictConfig,
    run_dir: Path,
    checkpoint: dict[str, Any] | None,
    on_fit_start: Callable[[], None] | None,
    built: Any,
    flat: FlatParameters,
    optimizer: torch.optim.Optimizer,
    logger: Any,
) -> dict[str, Any]:
    """The second half of `train`: fit, then evaluate best.pt and write metrics.json."""
    from vaekit.training.trainer import Diverged, Interrupted, Trainer

    model, data, device = built.model, built.data, built.device
    resumed_epoch = checkpoint["fit_state"]["epoch"] if checkpoint else None
    objective = objective_for(cfg.get("objective"), model, cfg.eval)  # an RBM's: contrastive divergence
    stop = StopRequest()
    trainer = Trainer(
        model,
        flat,
        optimizer,
        data,
        cfg.trainer,
        run_dir,
        logger,
        saved_config(cfg),
        stop,
        cfg.eval.batch_size,
        schedule=build_schedule(cfg.get("scheduler")),
        objective=objective,
    )
    if checkpoint is not None:
        trainer.restore(checkpoint, Path(cfg.resume) / "last.pt")
    log_start(cfg, built, run_dir, resumed_epoch)
    if not model.likelihood.discrete:
        log.warning(
            "%s is a density on discrete pixel values: its NELBO, IW-NLL and bits/dim are not "
            "comparable with those of the discrete likelihoods, and can be negative",
            type(model.likelihood).__name__,
        )
    if on_fit_start is not None:
        on_fit_start()
    overfit = None
    if cfg.trainer.overfit_check:  # measured before the first step and after the last
        overfit = OverfitCheck(model, built.raw, device, cfg.eval.batch_size)
    try:
        with stop:
            state = trainer.fit()
    except Interrupted as stopped:
        if trainer.world.is_main:
            record = {**fit_fields(trainer.state, cfg, data), "reason": str(stopped)}
            write_json(run_dir / "metrics.json", record)
        logger.close()
        stop.pass_on()  # under submitit, a preemption signal requeues the job: its rerun continues
        raise RunStopped(f"{stopped}; resume with: vaekit train resume={run_dir}", stop.exit_code) from None
    except Diverged as diverged:
        record = {**fit_fields(trainer.state, cfg, data), "reason": str(diverged)}
        if trainer.state.best_epoch > 0:  # the best model from before the divergence
            record.update(evaluate_best(model, data, run_dir, logger, trainer.state.best_epoch, cfg))
        if trainer.world.is_main:
            write_json(run_dir / "metrics.json", record)
        logger.close()
        raise RunStopped(str(diverged)) from None
    overfit_fields = overfit.finish(state.epoch) if overfit is not None else {}  # before best.pt is loaded
    metrics = {
        **evaluate_best(model, data, run_dir, logger, state.best_epoch, cfg),
        **fit_fields(state, cfg, data),
        **overfit_fields,
    }
    if trainer.world.is_main:
        write_json(run_dir / "metrics.json", metrics)
    logger.hparams(hparams_of(cfg), final_metrics(metrics))
    logger.close()
    return metrics


def check_same_data(checkpoint: dict[str, Any], data: DeviceData, path: Path) -> None:
    """A run continues only on the data it started on: one sentence naming the changed split."""
    changed = changed_splits(checkpoint.get("data_checksums"), data.checksums)
    if changed:
        raise VaekitError(
            f"The {changed[0]} split is not the one {path} was trained on (its checksum differs: "
            f"the dataset's files changed), so the run cannot continue: restore those files or "
            f"start a new run."
        )


def log_start(cfg: DictConfig, built: Any, run_dir: Path, resumed_epoch: int | None) -> None:
    """The run's first log line: what is trained, on what, where."""
    device = built.device
    n_params = sum(p.numel() for p in built.model.parameters())
    verb = f"resuming at epoch {resumed_epoch}:" if resumed_epoch is not None else "training"
    where = f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)
    name = type(built.model).__name__
    log.info(
        "%s %s on %s (%d parameters) on %s; run directory %s",
        verb,
        name,
        built.raw.name,
        n_params,
        where,
        run_dir,
    )


def evaluate_best(
    model: torch.nn.Module, data: DeviceData, run_dir: Path, logger: Any, best_epoch: int, cfg: DictConfig
) -> dict[str, Any]:
    """Load run_dir/best.pt into `model`, log its image grids and the test latent means
    (TensorBoard Projector) at step `best_epoch`, and return its test metrics (`test_*`) and
    the seconds each stage took (`seconds_after_training`: {stage: seconds}, also logged)."""
    clock = StageClock()
    model.load_state_dict(load_checkpoint(run_dir / "best.pt", data.device)["model"])
    clock.lap("load best.pt")
    e = cfg.eval
    shard = distributed.current().shard  # several processes: each scores its block of the test split
    progress = cfg.trainer.progress and shard is None
    conditional = getattr(model, "conditional", False)  # model.conditional=true: scored given the labels
    metrics, means = evaluate_model(
        model,
        data.test,
        e.iw_samples,
        e.nelbo_samples,
        e.batch_size,
        e.seed,
        progress,
        shard=shard,
        y=data.test_labels if conditional else None,
        ais_chains=e.ais_chains,
        ais_betas=e.ais_betas,
    )
    clock.lap("test metrics")
    if cfg.trainer.log_images:
        draw = cfg.trainer.images == "sample"
        val_labels = data.val_labels if conditional else None  # reconstructions given their labels
        logger.images(model, data.val, best_epoch, draw=draw, y=val_labels)  # the model that is evaluated
        clock.lap("image grids")
        for level, mean in means.items():
            tag = "latent_means" if len(means) == 1 else f"latent_means_{level}"
            logger.embedding(mean, data.test_labels, data.test, best_epoch, tag=tag)
        clock.lap("projector")
    record = {f"test_{key}": metrics[key] for key in metrics if key not in ("active_units", "latent_dims")}
    record.update({f"test_active_units_{level}": n for level, n in metrics["active_units"].items()})
    log.info("after training: %s", clock.summary())
    return {**record, "seconds_after_training": clock.laps}


class StageClock:
    """Seconds per named stage, measured one after another."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        """Close `stage`: the seconds since the previous lap."""
        now = time.perf_counter()
        self.laps[stage] = round(now - self.last, 4)
        self.last = now

    def summary(self) -> str:
        """'stage 1.23 s, stage 0.04 s'."""
        return ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in self.laps.items())


def summary_line(metrics: dict[str, Any], run_dir: Path) -> str:
    """The one line printed at the end of a run."""
    if metrics.get("test_estimator") == "ais":  # model=rbm: no NELBO; the NLL with its error
        scores = (
            f"test NLL (AIS, {metrics['test_ais_chains']} chains) {metrics['test_iw_nll']:.2f} "
            f"+- {metrics['test_iw_nll_stderr']:.2f}"
        )
    else:
        scores = (
            f"test NELBO {metrics['test_nelbo']:.2f} | IW-NLL (k={metrics['iw_samples']}) "
            f"{metrics['test_iw_nll']:.2f}"
        )
    return (
        f"{scores} | bits/dim {metrics['test_bpd']:.4f} | "
        f"best epoch {metrics['best_epoch']}/{metrics['epochs']} ({metrics['status']}) | "
        f"{metrics['train_seconds']:.1f} s | run: {run_dir}"
    )


OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """True for the allocator's failures, on the CPU (MemoryError, 'can't allocate') or a GPU."""
    if isinstance(error, MemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error).lower() for text in OUT_OF_MEMORY)


def describe_failure(error: BaseException) -> str:
    """The one sentence that says why a run failed."""
    if isinstance(error, VaekitError):
        return str(error)
    if isinstance(error, OSError):
        return describe_os_error(error)
    if is_out_of_memory(error):
        return (
            "The run ran out of memory: lower trainer.batch_size, eval.batch_size, model.latent_dim "
            "or net.hidden_dim (or the model's other sizes)."
        )
    return f"{type(error).__name__}: {error}"


def record_failure(error: BaseException, started: float, record_to: Path | None) -> str:
    """The one-sentence reason of a failure; with `record_to`, that file says the run failed and why."""
    reason = describe_failure(error)
    if record_to is not None:
        try:
            write_json(record_to, {"status": "failed", "reason": reason, "seconds": time.time() - started})
        except OSError:  # the disk that failed the run may refuse the record too: the message stays
            pass
    return reason


def _report_failure(error: BaseException, started: float, record_to: Path | None) -> None:
    """Print the one-sentence error; with `record_to`, that file says the run failed and why."""
    print(f"vaekit: error: {record_failure(error, started, record_to)}", file=sys.stderr, flush=True)


def refuse_finished_run(run_dir: Path) -> None:
    """A fresh `vaekit train` into a directory that already holds a run would overwrite its
    checkpoints and metrics: refuse, and say how to continue it instead."""
    metrics = run_dir / "metrics.json"
    failed_before = False
    if metrics.is_file():
        try:
            failed_before = json.loads(metrics.read_text()).get("status") == "failed"
        except (OSError, ValueError, AttributeError):
            failed_before = False
    holds_run = (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists()
    if holds_run or (metrics.exists() and not failed_before):
        raise VaekitError(
            f"{run_dir} already holds a run: continue it with `vaekit train resume={run_dir}`, "
            f"or train into another directory (hydra.run.dir=...)."
        )


def prepare_resume(cfg: DictConfig, hydra_cfg: Any) -> tuple[DictConfig, dict[str, Any]]:
    """The saved config and last.pt of cfg.resume, with every setting checked, so a refused
    resume changes none of the run's files."""
    from vaekit.training.trainer import check_resumable

    trusted = list(cfg.trust)
    cfg, checkpoint = resumed_config(cfg, list(hydra_cfg.overrides.task))
    check_trusted(checkpoint["config"], Path(cfg.resume) / "last.pt", trusted)  # before anything is built
    check_resumable(checkpoint, Path(cfg.resume) / "last.pt")
    check_settings(cfg)
    resolve_device(cfg.trainer.device)
    return cfg, checkpoint


def train_job(cfg: DictConfig, hydra_cfg: Any, run_dir: Path, record: dict[str, Path]) -> dict[str, Any]:
    """One `vaekit train` job, for the CLI and the Python API alike: lock run_dir, continue
    cfg.resume, or the run of this same config that run_dir holds (a requeued job: auto-resume),
    or refuse a directory that holds another run; train; returns the metrics.

    Once this process owns the run, record["to"] is the file a failure is to be written to.
    """

    def resume_started() -> None:  # from here on a failure is recorded beside the run's result
        record["to"] = run_dir / RESUME_FAILURE

    run_dir = distributed.share_run_dir(run_dir)  # several processes: rank 0's
    if not distributed.current().is_main:
        record = {}  # failures are recorded by rank 0 alone
    if not cfg.resume:  # a resumed run keeps the saved choices
        # model=rbm: no prior, posterior, net; model=ebm: no prior, posterior, likelihood
        check_model_choices(cfg, hydra_cfg.runtime.choices, list(hydra_cfg.overrides.task))
    with RunLock(run_dir) if distributed.holds_lock() else contextlib.nullcontext():
        checkpoint, on_fit_start = None, None
        if cfg.resume:  # refused until fitting starts: nothing of the run changes
            cfg, checkpoint = prepare_resume(cfg, hydra_cfg)
            on_fit_start = resume_started
        elif (rerun := find_rerun(cfg, saved_config(cfg), run_dir)) is not None:  # auto-resume
            if rerun.metrics is not None:
                log.info("%s already holds this run, finished: nothing to train", run_dir)
                return rerun.metrics
            cfg, checkpoint, on_fit_start = rerun.cfg, rerun.checkpoint, resume_started
        else:
            if distributed.current().is_main:
                refuse_finished_run(run_dir)
            record["to"] = run_dir / "metrics.json"
        if distributed.must_launch(cfg.trainer.devices):  # trainer.devices=N: the job as N processes
            check_settings(cfg)
            distributed.check_devices(cfg.trainer.devices, resolve_device(cfg.trainer.device))
            return distributed.launch(cfg.trainer.devices, hydra_cfg, run_dir)
        return train(cfg, run_dir, checkpoint, on_fit_start)


register_schema()
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra entry point of `vaekit train`; returns the best validation NELBO (for sweepers:
    Optuna minimizes it; a test metric would select on the test set).

    In a sweep a failed or diverged job returns None, which Optuna records as a failed trial
    and searches on; its metrics.json says why, and the sweep's summary
    (vaekit.commands.callbacks) names it at the end.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    started = time.time()
    record: dict[str, Path] = {}  # where a failure is written ("to"): nowhere until this process owns the run
    set_job_threads(cfg.trainer.num_threads, hydra_cfg)  # jobs side by side: share the cores
    try:
        if cfg.resume and multirun:
            raise VaekitError("resume continues one run at a time: drop -m/--multirun.")
        metrics = train_job(cfg, hydra_cfg, run_dir, record)
    except RunStopped as stopped:  # interrupted or diverged: metrics.json says so already
        if distributed.current().is_main:  # one message for all processes
            print(f"vaekit: {stopped}", file=sys.stderr, flush=True)
        if not multirun or stopped.exit_code != 1:
            sys.exit(stopped.exit_code)  # an interrupt also stops the rest of a sweep
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
        _report_failure(error, started, record.get("to"))
        full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
        expected = isinstance(error, (VaekitError, OSError)) or is_out_of_memory(error)
        if full_error or (not multirun and not expected):
            raise  # a bug, not bad input (or asked for): Hydra shows where it happened
        if not multirun:
            sys.exit(1)
        return None
    if distributed.prints_summary():
        print(summary_line(metrics, run_dir), flush=True)
    # the best validation bound of the objective trained: sweepers never select on the test set
    value = metrics.get(f"val_{metrics.get('stopped_on', 'nelbo')}")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
