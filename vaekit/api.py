"""The Python API: train, load and evaluate runs from a notebook or a script.

    import vaekit
    metrics = vaekit.train(["prior=vampprior", "trainer.max_epochs=5"], run_dir="outputs/nb")
    run = vaekit.load_run("outputs/nb")                    # model, config, data, metrics
    grid = run.model.sample(64)                            # (64, C, H, W), on run.device
    vaekit.evaluate(run, k=5000)                           # what `vaekit evaluate` prints

`train` composes the config with Hydra's compose API from the CLI's config folder and runs
the job `vaekit train` runs (vaekit.commands.train.train_job), through Hydra's own run_job,
so the run directory (.hydra/, train.log, tb/, best.pt, last.pt, metrics.json) and the
refusals are the CLI's. Bad input raises VaekitError, one sentence; nothing is trained.
Torch and Hydra are imported on the first call, not with `import vaekit`.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaekit.errors import RunStopped, VaekitError
from vaekit.runs import Run

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = ["Run", "evaluate", "load_run", "train"]

CONFIG_NAME = "train"  # configs/train.yaml, as for the CLI


def train(overrides: Sequence[str] | DictConfig = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train as `vaekit train OVERRIDES hydra.run.dir=RUN_DIR` does; returns metrics.json's fields.

    `overrides`: the command line's words (["prior=vampprior", "+debug=fast"]), or a config
    (e.g. composed with hydra.compose and edited), whose differences from the default config
    are recorded as the run's overrides. `run_dir`: where the run goes (default: the CLI's
    outputs/<date>/<time>, relative to the working directory). Raises VaekitError for bad
    input, or a directory that already holds a run (continue it with ["resume=DIR"]).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    from vaekit.commands import train as command  # registers the schema and resolvers
    from vaekit.presets import check_presets

    if isinstance(overrides, str):
        raise VaekitError(f"overrides must be a list of strings such as ['{overrides}'], not one string.")
    given = overrides if isinstance(overrides, DictConfig) else None
    words = [] if given is not None else [str(word) for word in overrides]
    check_presets(words, command.CONFIG_DIR)
    where = [] if run_dir is None else [f"hydra.run.dir={_override_value(Path(run_dir).expanduser())}"]
    with initialize_config_dir(str(command.CONFIG_DIR), version_base="1.3", job_name=CONFIG_NAME):
        try:
            config = compose(CONFIG_NAME, overrides=[*words, *where], return_hydra_config=True)
            if given is not None:
                config = _with_task(config, given)
        except (HydraException, OmegaConfBaseException) as error:
            raise VaekitError(_first_line(error)) from error
        with _read_write(config):
            config.hydra.mode = RunMode.RUN
        _check_run_dir(config)
        metrics = _run(config)
    print(command.summary_line(metrics, Path(metrics["run_dir"])), flush=True)
    return metrics


def load_run(
    path: str | Path, which: str = "best", device: str = "auto", trust: Sequence[str] = ()
) -> Run:
    """The run at `path` with the model of its best.pt (or last.pt), in eval mode on `device`.

    Weights-only loading; the saved config may build only vaekit's and torch.optim's classes
    (and modules under the `trust` prefixes). `.data` and `.raw` load the splits on first use.
    """
    from vaekit.runs import load_run as load

    return load(Path(path).expanduser(), device, trust, which=which, lazy=True, device_option="device")


def evaluate(
    run: Run | str | Path,
    k: int | None = None,
    split: str = "test",
    nelbo_samples: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    progress: bool = True,
    trust: Sequence[str] = (),
) -> dict[str, Any]:
    """What `vaekit evaluate` prints, for a loaded Run (its checkpoint, on its device) or a run
    directory (its best.pt, on `device`): NELBO, IW-NLL with k samples, bits/dim, active units.

    k, batch_size and seed default to eval.* (vaekit/schema.py); nelbo_samples None: all k.
    The result is also written beside the checkpoint (its "path").
    """
    from vaekit.commands.evaluate import check_options, score_run
    from vaekit.schema import EvalConfig

    defaults = EvalConfig()
    k = defaults.iw_samples if k is None else k
    batch_size = defaults.batch_size if batch_size is None else batch_size
    seed = defaults.seed if seed is None else seed
    check_options(k, split, batch_size, seed, nelbo_samples)
    if not isinstance(run, Run):
        run = load_run(run, device=device, trust=trust)
    return score_run(run, k, split, batch_size, seed, progress, nelbo_samples)


def _run(config: DictConfig) -> dict[str, Any]:
    """Run the job through Hydra's run_job (which writes .hydra/) with the config's callbacks;
    Hydra is initialized on the config folder."""
    from hydra._internal.callbacks import Callbacks  # what Hydra's own run() notifies
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import run_job
    from hydra.types import HydraContext

    from vaekit.commands import train as command

    callbacks = Callbacks(config)
    callbacks.on_run_start(config=config, config_name=CONFIG_NAME)

    failed: list[Exception] = []  # raised here, not by Hydra (whose JobReturn prints to stderr)

    def job(cfg: DictConfig) -> dict[str, Any] | None:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        record: dict[str, Path] = {}
        started = time.time()
        with _train_log(run_dir / f"{hydra_cfg.job.name}.log", hydra_cfg.job_logging):
            try:
                metrics = command.train_job(cfg, hydra_cfg, run_dir, record)
            except RunStopped as stopped:  # interrupted or diverged: metrics.json says so already
                failed.append(stopped)
                return None
            except Exception as error:  # recorded as the CLI records it; bad input stays one sentence
                reason = command.record_failure(error, started, record.get("to"))
                if isinstance(error, OSError):  # a full disk, an unwritable file: one sentence
                    said = VaekitError(reason)
                    said.__cause__ = error
                    error = said
                failed.append(error)
                return None
        return {**metrics, "run_dir": str(run_dir)}

    loader = GlobalHydra.instance().config_loader()
    context = HydraContext(config_loader=loader, callbacks=callbacks)
    ret = run_job(job, config, "hydra.run.dir", None, context, configure_logging=False)
    callbacks.on_run_end(config=config, config_name=CONFIG_NAME, job_return=ret)
    if failed:
        raise failed[0]
    return ret.return_value


@contextmanager
def _train_log(path: Path, job_logging: Any) -> Iterator[None]:
    """vaekit's log lines into `path` (and onto stdout when nothing else shows them), in the
    CLI's format, for the job only: the caller's logging setup is left as it was."""
    simple = job_logging.formatters.simple
    formatter = logging.Formatter(simple.format, simple.get("datefmt"))
    root, vaekit_log = logging.getLogger(), logging.getLogger("vaekit")
    handlers: list[logging.Handler] = [logging.FileHandler(path)]
    if not root.handlers:  # a notebook or script that set up no logging would see nothing
        handlers.append(logging.StreamHandler(sys.stdout))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    level = vaekit_log.level
    vaekit_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        vaekit_log.setLevel(level)
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()


def _check_run_dir(config: DictConfig) -> None:
    """The CLI's check of the run directory (OutputDirCheck), as a VaekitError; and a directory
    that holds a run is refused here, before run_job rewrites its .hydra/ files."""
    from vaekit.commands.callbacks import check_output_dir, check_resume_target
    from vaekit.commands.train import refuse_finished_run

    if config.get("resume"):
        check_resume_target(Path(config.resume))
    else:
        check_output_dir(Path(config.hydra.run.dir), "hydra.run.dir")
        refuse_finished_run(Path(config.hydra.run.dir))


def _with_task(composed: DictConfig, given: DictConfig) -> DictConfig:
    """`given` (a task config, typed by the schema) under the hydra node of `composed`, the
    default config; its differences from that default become the run's overrides, and a
    group that differs from its default option is shown without an option name."""
    from omegaconf import OmegaConf, open_dict

    from vaekit.schema import TrainConfig

    task = OmegaConf.masked_copy(given, [key for key in given if key != "hydra"])
    config = OmegaConf.merge(OmegaConf.structured(TrainConfig), task)
    default = OmegaConf.masked_copy(composed, [key for key in composed if key != "hydra"])
    changed = _differences(default, config)
    with open_dict(config):
        config.hydra = composed.hydra
    with _read_write(config):
        config.hydra.overrides.task = changed
        for group in list(config.hydra.runtime.choices):
            if group in default and OmegaConf.to_container(default[group]) != OmegaConf.to_container(
                config[group]
            ):
                del config.hydra.runtime.choices[group]
    return config


def _differences(default: DictConfig, config: DictConfig) -> list[str]:
    """Overrides that turn `default` into `config`, leaf by leaf: key=value, +key=value, ~key."""
    from omegaconf import OmegaConf

    def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict) and node:
            found: dict[str, Any] = {}
            for key, value in node.items():
                found.update(leaves(value, f"{prefix}{key}."))
            return found
        return {prefix[:-1]: node}

    before = leaves(OmegaConf.to_container(default, resolve=False))
    after = leaves(OmegaConf.to_container(config, resolve=False))

    def show(value: Any) -> str:  # as Hydra's override grammar writes it
        if value is None or isinstance(value, bool):
            return {None: "null", True: "true", False: "false"}[value]
        return str(value).replace(" ", "").replace("'", "")

    changed = [f"{key}={show(after[key])}" for key in after if key in before and after[key] != before[key]]
    changed += [f"+{key}={show(after[key])}" for key in after if key not in before]
    changed += [f"~{key}" for key in before if key not in after]
    return changed


@contextmanager
def _read_write(config: DictConfig) -> Iterator[None]:
    """Hydra's config nodes are read-only and struct: editable inside this block."""
    from omegaconf import open_dict, read_write

    with read_write(config), open_dict(config):
        yield


def _override_value(path: Path) -> str:
    """A path as the value of a Hydra override: quoted where Hydra's grammar would split it."""
    text = str(path)
    if re.fullmatch(r"[\w./~+-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _first_line(error: Exception) -> str:
    """Hydra's composition errors (an unknown option, a bad override) in one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
