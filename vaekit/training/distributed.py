"""Data-parallel training over several processes (torch.distributed: gloo on the CPU, NCCL on GPUs).

Started by `torchrun --nproc_per_node=N -m vaekit train ...`, or by `trainer.devices=N`, which
runs that same torchrun command on this machine. Every process holds the whole model and data;
per step each takes its rows of the same global batch (`vaekit.shards`: the batch's
binarization and Gaussian noise are drawn whole by every process, so each example gets the
noise one process would give it), and the gradients are summed with one all-reduce of the flat
gradient buffer (each process's loss is its share of the global batch mean). Validation and the
test pass are shared out and their sums all-reduced, the guard's loss and the stop request are
all-reduced every step: every process takes the same decisions from the same numbers. Rank 0
alone writes the run directory (checkpoints, loggers, metrics.json, Hydra's files); the others
get `SilentLogger`. The RNG streams are the same in every process, so a checkpoint resumes with
any number of processes that divides the batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vaekit.errors import RunStopped, VaekitError
from vaekit.loggers.base import Logger
from vaekit.shards import Shard

log = logging.getLogger("vaekit")

SPAWNED = "VAEKIT_SPAWNED_BY"  # set for the processes that `trainer.devices` starts: the pid holding the run
INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve")
_received: dict[str, str] = {}  # the run directory rank 0 sent, once


@dataclass(frozen=True)
class World:
    """This process's place among `size` processes: `rank` (0 writes the run), `local_rank`
    (its GPU on this machine). size 1: a lone process, every method a no-op."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True in the process that writes the run directory."""
        return self.rank == 0

    @property
    def shard(self) -> Shard | None:
        """How this process shares batches and sums (`vaekit.shards.Shard`); None when alone."""
        return Shard(self.rank, self.size, self.sum_) if self.size > 1 else None

    def sum_(self, tensor: Tensor) -> Tensor:
        """tensor summed over all processes, in place (and returned)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds in any process (a host-side all-reduce of one number)."""
        if self.size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return bool(value.item() > 0)

    def broadcast_model(self, model: nn.Module, parameters: bool = True) -> None:
        """Rank 0's parameters (unless `parameters` is False) and buffers (e.g. BatchNorm's
        running statistics) in every process, one broadcast per dtype."""
        if self.size == 1:
            return
        tensors = [p.data for p in model.parameters()] if parameters else []
        tensors += list(model.buffers())
        if not tensors:
            return
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
                t.copy_(part.view_as(t))

    def barrier(self) -> None:
        """Wait until every process is here (e.g. until rank 0 has written best.pt)."""
        if self.size > 1:
            dist.barrier()


def launched() -> bool:
    """True in a process that torchrun started as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join() -> World:
    """Join the process group torchrun set up (once; idempotent) and return this process's World:
    gloo for CPU tensors, and NCCL for CUDA tensors where there is a GPU."""
    if not launched():
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return current()


def leave(finished: bool) -> None:
    """Leave the process group, if this process joined one: after a barrier when the run
    `finished` (so no process exits while another still talks to it), at once after an error.
    gloo's threads abort the process at exit ("terminate called without an active exception")
    when the group is left standing."""
    if not dist.is_available() or not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def current() -> World:
    """This process's World: from the process group once joined, else a lone process."""
    if not dist.is_available() or not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def override_value(text: str) -> str:
    """A value for a Hydra override, quoted where Hydra's grammar would split it."""
    if re.fullmatch(r"[\w./~+-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def prepare_argv(args: list[str]) -> list[str]:
    """The `vaekit train` arguments of this process. Under torchrun every process joins the group
    here, before Hydra starts; ranks above 0 then train in rank 0's run directory without
    writing to it (no .hydra/ files, no train.log), so they wait for rank 0 to name it."""
    if not launched() or any(arg.split("=", 1)[0] in INFO_FLAGS for arg in args):
        return args
    if any(arg in ("-m", "--multirun") or arg.startswith("--multirun=") for arg in args):
        raise VaekitError("torchrun runs one training job over several processes: drop -m/--multirun.")
    world = join()
    if world.is_main:
        return args
    run_dir = _receive_run_dir()
    quiet = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return [*args, f"hydra.run.dir={override_value(run_dir)}", *quiet]


def _receive_run_dir() -> str:
    if "run_dir" not in _received:
        message = [None]
        dist.broadcast_object_list(message, src=0, device=torch.device("cpu"))
        _received["run_dir"] = str(message[0])
    return _received["run_dir"]


def share_run_dir(run_dir: Path) -> Path:
    """The one run directory of all processes: rank 0's, sent to the others (who may have
    received it already, before Hydra started: `prepare_argv`)."""
    world = join()
    if world.size == 1:
        return run_dir
    if world.is_main:
        if "run_dir" not in _received:
            dist.broadcast_object_list([str(run_dir)], src=0, device=torch.device("cpu"))
            _received["run_dir"] = str(run_dir)
        return run_dir
    return Path(_receive_run_dir())


def holds_lock() -> bool:
    """Whether this process takes the run directory's lock: rank 0, unless `trainer.devices`
    started it (then the process that did holds the lock for it)."""
    return current().is_main and SPAWNED not in os.environ


def prints_summary() -> bool:
    """Whether this process prints the run's last line: rank 0, unless `trainer.devices`
    started it (then the process that did prints it)."""
    return current().is_main and SPAWNED not in os.environ


def rank_device(device: torch.device, option: str = "trainer.device") -> torch.device:
    """The device of this process: with several processes on GPUs, the GPU of its LOCAL_RANK."""
    world = current()
    if world.size == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise VaekitError(
            f"{option}={device} names one GPU, but each of the {world.size} processes takes its own: "
            f"use {option}=cuda (process i trains on the GPU of its LOCAL_RANK)."
        )
    if world.local_rank >= torch.cuda.device_count():
        raise VaekitError(
            f"This machine has {torch.cuda.device_count()} GPU(s), fewer than the processes started "
            f"on it: start at most {torch.cuda.device_count()} per machine."
        )
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def check_devices(devices: int, device: torch.device) -> None:
    """Refuse, in one sentence, `trainer.devices` that this machine cannot give processes to.
    Under torchrun it is not used: torchrun decides how many processes there are (so a resumed
    run's saved value does not matter)."""
    if devices < 1:
        raise VaekitError(f"trainer.devices must be at least 1, not {devices}.")
    if current().size > 1 or devices == 1:
        return
    if device.type == "cuda" and devices > torch.cuda.device_count():
        raise VaekitError(
            f"trainer.devices={devices} asks for {devices} GPUs, but this machine has "
            f"{torch.cuda.device_count()}: lower trainer.devices."
        )
    if device.type == "cpu" and devices > (os.cpu_count() or 1):
        raise VaekitError(
            f"trainer.devices={devices} asks for {devices} processes on the CPU, but this machine "
            f"has {os.cpu_count()} cores: lower trainer.devices."
        )
    if device.type not in ("cpu", "cuda"):
        raise VaekitError(f"trainer.devices > 1 runs on the CPU or CUDA GPUs, not on {device.type}.")


def check_world(cfg: Any, model: nn.Module, sizes: dict[str, int]) -> None:
    """Refuse, in one sentence, what several processes cannot train alike: a batch they cannot
    share evenly, a split smaller than the processes, noise that cannot be shared out.
    sizes: examples in the train, val and test splits."""
    world = current()
    if world.size == 1:
        return
    batch, n = cfg.trainer.batch_size, world.size
    if batch % n:
        raise VaekitError(
            f"trainer.batch_size={batch} cannot be split evenly over {n} processes: use a multiple "
            f"of {n} (each process takes batch_size / {n} examples of every batch)."
        )
    last = sizes["train"] % batch
    if 0 < last < n:
        raise VaekitError(
            f"The last batch of each epoch holds {last} example(s), fewer than the {n} processes: "
            f"choose a trainer.batch_size that leaves 0 or at least {n} examples over."
        )
    for split in ("val", "test"):
        if sizes[split] < n:
            raise VaekitError(f"The {split} split has {sizes[split]} examples, fewer than the {n} processes.")
    if cfg.eval.batch_size < n:
        raise VaekitError(f"eval.batch_size={cfg.eval.batch_size} must be at least the {n} processes.")
    if getattr(getattr(model, "posterior", None), "on_sphere", False):
        raise VaekitError(
            f"posterior={type(model.posterior).__name__} draws noise that vaekit cannot share out "
            f"over processes: train it in one process (without torchrun or trainer.devices)."
        )


class SilentLogger(Logger):
    """The logger of ranks above 0: records nothing, draws nothing."""

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        pass

    def images(self, model: nn.Module, x: Tensor, step: int, *args: Any, **kwargs: Any) -> None:
        pass  # the same arguments as Logger.images; rank 0 draws the grids

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        pass


def must_launch(devices: int) -> bool:
    """True when `trainer.devices` asks for several processes and this is not yet one of them."""
    return devices > 1 and current().size == 1 and not launched()


def launch(devices: int, hydra_cfg: Any, run_dir: Path) -> dict[str, Any]:
    """Run this `vaekit train` job as `torchrun --standalone --nproc_per_node=devices` in the
    same run directory (this process keeps its lock) and return the metrics rank 0 wrote.
    Raises RunStopped, with the processes' exit code, when they did not finish."""
    import json

    sources = [s for s in hydra_cfg.runtime.config_sources if s.provider == "command-line"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
        "-m", "vaekit", "train",
        *(f"--config-dir={source.path}" for source in sources),
        *hydra_cfg.overrides.task,
        f"hydra.run.dir={override_value(str(run_dir))}",
        "hydra.output_subdir=null",  # this process wrote .hydra/ already
    ]  # fmt: skip
    log.info("starting %d training processes: %s", devices, " ".join(command[1:6]))
    env = {**os.environ, SPAWNED: str(os.getpid())}
    child = subprocess.Popen(command, env=env)
    received: list[int] = []

    def note(signum: int, frame: Any) -> None:  # Ctrl-C reaches the processes directly (one group)
        received.append(signum)

    def forward(signum: int, frame: Any) -> None:  # a SIGTERM sent here is passed on
        received.append(signum)
        child.send_signal(signum)

    with _handlers({signal.SIGINT: note, signal.SIGTERM: forward}):
        code = child.wait()
    metrics_path = run_dir / "metrics.json"
    record = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if code == 0 and record:
        return record
    if record.get("status") == "interrupted":  # rank 0 said where it stopped, and how to resume
        raise RunStopped(f"the {devices} training processes stopped", 128 + received[0] if received else 1)
    raise RunStopped(f"the {devices} training processes ended with exit code {code}", code or 1)


@contextlib.contextmanager
def _handlers(handlers: dict[int, Any]) -> Any:
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
