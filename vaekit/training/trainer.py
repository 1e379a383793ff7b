"""The fitting loop: epochs over device-resident data, validation NELBO, early stopping,
atomic checkpoints (best.pt on improvement, last.pt every epoch and on interruption),
roll-back on divergence, exact resumption, logging.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vaekit.data import DeviceData
from vaekit.errors import VaekitError
from vaekit.evaluation.metrics import nelbo_terms
from vaekit.rng import own_rng
from vaekit.schema import TrainerConfig
from vaekit.training import rng_state
from vaekit.training.checkpoint import CHECKPOINT_FORMAT, load_weights, save_atomic
from vaekit.training.flatten import FlatParameters
from vaekit.training.signals import StopRequest

if TYPE_CHECKING:  # the TensorBoard writer is imported by whoever makes the logger
    from vaekit.loggers.tensorboard import RunLogger

log = logging.getLogger("vaekit")

VALIDATION_SEED = 2024


class Diverged(Exception):
    """Training gave up after too many roll-backs; the message is one sentence."""


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM); last.pt holds the state after the last step."""


class _RollBack(Exception):
    """Internal: abandon the current epoch and return to the last good state."""


@dataclass
class FitState:
    """Counters that early stopping and resumption need; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    best_val: float = math.inf
    best_epoch: int = 0
    epochs_since_best: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    rollbacks: int = 0
    train_seconds: float = 0.0
    status: str = "running"  # running, early_stopped, finished, interrupted, diverged


@dataclass
class EpochProgress:
    """Where the current epoch stands: saved when a run is interrupted mid-epoch."""

    perm: Tensor  # (N,) the epoch's order of the training split
    step: int = 0  # batches done
    sums: Tensor | None = None  # running sums of the logged terms
    names: tuple[str, ...] = ()
    count: int = 0  # examples done


class Trainer:
    """Fits `model` on `data` with `optimizer`; writes checkpoints and logs into run_dir.

    `stop` is the request that SIGINT/SIGTERM set; `config` (plain data) is saved in every
    checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        flat: FlatParameters,
        optimizer: torch.optim.Optimizer,
        data: DeviceData,
        settings: TrainerConfig,
        run_dir: Path,
        logger: RunLogger,
        config: dict[str, Any],
        stop: StopRequest,
        eval_batch_size: int,
    ) -> None:
        self.model = model
        self.flat = flat
        self.optimizer = optimizer
        self.data = data
        self.settings = settings
        self.run_dir = run_dir
        self.logger = logger
        self.config = config
        self.stop = stop
        self.eval_batch_size = eval_batch_size  # examples per validation forward pass
        self.state = FitState()
        self.progress: EpochProgress | None = None
        self.generator = torch.Generator().manual_seed(settings.seed + 1)  # the data's stream, on the CPU
        self.forward = torch.compile(model) if settings.compile else model
        self.last_image_epoch = -math.inf
        self.good_state: dict[str, Any] | None = None

    # ----------------------------------------------------------------- the loop
    def fit(self) -> FitState:
        """Train until early stopping, max_epochs, interruption or divergence.

        Returns the final FitState; raises Interrupted (after writing last.pt) or Diverged.
        """
        s = self.settings
        self.state.status = "running"
        self.good_state = self.checkpoint()
        bar = tqdm(
            total=s.max_epochs, initial=self.state.epoch, desc="train", unit="epoch", disable=not s.progress
        )
        try:
            while self._should_continue():
                start = time.perf_counter()
                try:
                    train_terms = self._train_epoch()
                except _RollBack:
                    self._roll_back()
                    continue
                val_terms = self._validate()
                improved = self._update_early_stopping(val_terms["nelbo"], self.state.epoch)
                self._log_epoch(self.state.epoch, train_terms, val_terms, improved)
                self.state.train_seconds += time.perf_counter() - start
                snapshot = self._save_last(also_best=improved)
                if math.isfinite(val_terms["nelbo"]):
                    self.good_state = snapshot
                bar.update(1)
                bar.set_postfix(val=f"{val_terms['nelbo']:.2f}", best=f"{self.state.best_val:.2f}")
        finally:
            bar.close()
        return self.state

    def _should_continue(self) -> bool:
        """False once early stopping or max_epochs says so (also right after a resume)."""
        st = self.state
        if st.epochs_since_best >= self.settings.patience and st.best_epoch > 0:
            st.status = "early_stopped"
        elif st.epoch >= self.settings.max_epochs:
            st.status = "finished"
        return st.status == "running"

    def beta(self) -> float:
        """KL weight of the current epoch: rises linearly from 1/W to 1 over W warm-up epochs."""
        warmup = self.settings.kl_warmup_epochs
        return 1.0 if warmup <= 0 else min(1.0, (self.state.epoch + 1) / warmup)

    def _train_epoch(self) -> dict[str, float]:
        """One pass over a permutation (continuing a resumed one); mean train terms per example."""
        self.model.train()
        beta, free_bits, bs = self.beta(), self.settings.free_bits, self.settings.batch_size
        if self.progress is None:
            self.progress = EpochProgress(perm=self.data.permutation(self.generator))
        p = self.progress
        for step in range(p.step, self.data.num_train_batches(bs)):
            x = self.data.train_batch(p.perm, step, bs, self.generator)
            elbo = self.forward(x, beta=beta, free_bits=free_bits)
            loss = elbo.loss.mean()
            self.flat.zero_grad()
            loss.backward()
            if self._finite_step(loss):
                self.optimizer.step()
                terms = [elbo.nelbo, elbo.rec, elbo.kl, *elbo.kl_per_level.values()]
                batch_sums = torch.stack([t.detach().sum() for t in terms])
                p.sums = batch_sums if p.sums is None else p.sums + batch_sums
                p.names = p.names or ("nelbo", "rec", "kl", *(f"kl/{k}" for k in elbo.kl_per_level))
                p.count += x.shape[0]
            p.step = step + 1
            if self.stop.requested:
                self._interrupt()
        self.progress = None
        self.state.epoch += 1
        if p.sums is None:
            return {}
        means = (p.sums / p.count).tolist()  # the epoch's one host sync
        return dict(zip(p.names, means, strict=True))

    def _finite_step(self, loss: Tensor) -> bool:
        """Clip the gradient if asked; False (step skipped) when loss or gradient is not finite."""
        if self.settings.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_([self.flat.param], self.settings.grad_clip)
        else:
            norm = self.flat.grad_norm()
        if bool(torch.isfinite(loss.detach() + norm)):
            self.state.nonfinite_in_a_row = 0
            return True
        self.state.nonfinite_in_a_row += 1
        self.state.nonfinite_total += 1
        if self.state.nonfinite_in_a_row >= self.settings.max_nonfinite_steps:
            raise _RollBack
        return False

    def _validate(self) -> dict[str, float]:
        """Validation NELBO with the same noise every epoch (common random numbers).

        Fixed noise makes epochs comparable, so early stopping reacts to the model and not
        to a lucky draw; forking the RNG keeps validation from shifting the training stream.
        """
        self.model.eval()
        with own_rng(self.data.device):
            torch.manual_seed(VALIDATION_SEED)
            return nelbo_terms(self.model, self.data.val, self.eval_batch_size)

    def _update_early_stopping(self, val_nelbo: float, epoch: int) -> bool:
        """Record the epoch's validation NELBO; True when it improved (best.pt is due)."""
        st = self.state
        improved = math.isfinite(val_nelbo) and val_nelbo < st.best_val - self.settings.min_delta
        if improved:
            st.best_val, st.best_epoch, st.epochs_since_best = val_nelbo, epoch, 0
        else:
            st.epochs_since_best += 1
        return improved

    # ------------------------------------------------------ divergence and stops
    def _roll_back(self) -> None:
        """Return to the last good state with a lower learning rate, or give up."""
        st = self.state
        if st.rollbacks >= self.settings.max_rollbacks:
            st.status = "diverged"
            kept = f"best.pt keeps the model of epoch {st.best_epoch}" if st.best_epoch else "no best.pt"
            raise Diverged(
                f"Training diverged: {self.settings.max_nonfinite_steps} non-finite steps in a row "
                f"at epoch {st.epoch + 1} after {st.rollbacks} roll-back(s) ({kept}); "
                f"try a lower optimizer.lr or set trainer.grad_clip."
            )
        good = self.good_state
        lrs = [group["lr"] * self.settings.rollback_lr_factor for group in self.optimizer.param_groups]
        self.model.load_state_dict(good["model"])
        self.optimizer.load_state_dict(good["optimizer"])  # this also restores the old lr...
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr  # ...so the lowered one is set afterwards
        st.rollbacks += 1
        st.nonfinite_in_a_row = 0
        self.progress = None  # the abandoned epoch starts afresh (its number is reused)
        lr = self.optimizer.param_groups[0]["lr"]
        log.warning(
            "non-finite loss or gradient for %d steps in a row at epoch %d: rolled back to the "
            "state of epoch %d, learning rate now %.3g (roll-back %d of at most %d)",
            self.settings.max_nonfinite_steps,
            st.epoch + 1,
            good["fit_state"]["epoch"],
            lr,
            st.rollbacks,
            self.settings.max_rollbacks,
        )
        self.logger.scalars("train", {"rollbacks": st.rollbacks, "lr": lr}, st.epoch + 1)

    def _interrupt(self) -> None:
        """Write last.pt with the state after the last step, then raise Interrupted."""
        self.state.status = "interrupted"
        save_atomic(self.checkpoint(), self.run_dir / "last.pt")
        raise Interrupted(
            f"stopped at epoch {self.state.epoch + 1}, step {self.progress.step} "
            f"({self.stop.signal_name}); last.pt holds that state"
        )

    # --------------------------------------------------------------- logging
    def _log_epoch(self, epoch: int, train: dict[str, float], val: dict[str, float], improved: bool) -> None:
        self.logger.scalars("train", train, epoch)
        self.logger.scalars("val", val, epoch)
        due = epoch - self.last_image_epoch >= self.settings.image_every
        if improved and due and self.settings.log_images:
            self.log_images(epoch)

    def log_images(self, step: int) -> None:
        """Sample and reconstruction grids of the model as it is now, tagged with `step`."""
        self.logger.images(self.model, self.data.val, step, draw=self.settings.images == "sample")
        self.last_image_epoch = step

    # ----------------------------------------------------------- checkpoints
    def checkpoint(self) -> dict[str, Any]:
        """A snapshot of everything needed to evaluate or resume: weights, optimizer, counters,
        the position inside an unfinished epoch, every RNG stream, the config and the checksums
        of the data splits. Tensors are copies on the CPU, so the file loads on any machine."""
        progress = None
        if self.progress is not None:
            progress = {**asdict(self.progress), "names": list(self.progress.names)}
        return {
            "format": CHECKPOINT_FORMAT,
            "model": on_cpu(self.model.state_dict()),
            "optimizer": on_cpu(self.optimizer.state_dict()),
            "fit_state": asdict(self.state),
            "epoch_progress": on_cpu(progress),
            "rng": rng_state.capture(self.generator, self.data.device),
            "config": self.config,
            "data_checksums": dict(self.data.checksums),
        }

    def restore(self, checkpoint: dict[str, Any], path: Path) -> None:
        """Continue from a checkpoint of this trainer (read from `path`, and checked by
        `check_resumable`): the exact state it was saved in."""
        load_weights(self.model, checkpoint["model"], path)
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as error:
            raise VaekitError(
                f"{path} holds an optimizer state that does not fit this model ({error})."
            ) from error
        known = {f.name for f in fields(FitState)}
        self.state = FitState(**{k: v for k, v in checkpoint["fit_state"].items() if k in known})
        progress = checkpoint.get("epoch_progress")
        if progress is not None:
            progress = {**progress, "names": tuple(progress["names"])}
            progress["perm"] = progress["perm"].to(self.data.device)
            if progress["sums"] is not None:
                progress["sums"] = progress["sums"].to(self.data.device)
            self.progress = EpochProgress(**progress)
        position = (self.state.epoch, self.progress.step if self.progress is not None else 0)
        rng_state.restore(checkpoint["rng"], self.generator, self.data.device, self.settings.seed, position)
        self.last_image_epoch = self.state.epoch

    def _save_last(self, also_best: bool) -> dict[str, Any]:
        """last.pt every epoch; on improvement the same file is published as best.pt.
        Returns the snapshot that was written (the roll-back target when it is finite)."""
        snapshot = self.checkpoint()
        best = self.run_dir / "best.pt" if also_best else None
        save_atomic(snapshot, self.run_dir / "last.pt", also=best)
        return snapshot


# What each counter of a saved FitState must be (a float counter may have been saved as an int).
FIT_STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    f.name: (int, float) if isinstance(f.default, float) else type(f.default) for f in fields(FitState)
}


def check_resumable(checkpoint: dict[str, Any], path: Path) -> None:
    """Refuse, in one sentence naming `path`, a checkpoint that lacks what `Trainer.restore`
    reads (optimizer, counters, RNG streams, the unfinished epoch) or holds it in the wrong form."""

    def refuse(what: str) -> None:
        raise VaekitError(f"{path} cannot be resumed: {what}.")

    fit_state, optimizer, rng = (
        checkpoint.get("fit_state"),
        checkpoint.get("optimizer"),
        checkpoint.get("rng"),
    )
    if not isinstance(fit_state, dict):
        refuse("it holds no fit_state")
    for name, kind in FIT_STATE_TYPES.items():
        value = fit_state.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            refuse(f"its fit_state.{name} is {value!r}")
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        refuse("it holds no optimizer state")
    rng_problem = rng_state.check_rng(rng)
    if rng_problem is not None:
        refuse(rng_problem)
    progress = checkpoint.get("epoch_progress")
    if progress is None:
        return
    if not isinstance(progress, dict) or not isinstance(progress.get("perm"), Tensor):
        refuse("its epoch_progress has no permutation")
    if type(progress.get("step")) is not int or type(progress.get("count")) is not int:
        refuse("its epoch_progress has no step and example counts")
    if not isinstance(progress.get("names"), (list, tuple)) or not isinstance(
        progress.get("sums"), (Tensor, type(None))
    ):
        refuse("its epoch_progress has no running sums")


def on_cpu(obj: Any) -> Any:
    """A copy of nested dicts, lists and tuples with every tensor detached and on the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: on_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(value) for value in obj)
    return copy.deepcopy(obj)
