"""The fitting loop: epochs over device-resident data, validation NELBO, early stopping,
atomic checkpoints (best.pt on improvement, last.pt every epoch and on interruption),
roll-back on divergence, exact resumption, logging.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vaekit.data import DeviceData
from vaekit.errors import VaekitError
from vaekit.objectives import Objective
from vaekit.rng import own_rng
from vaekit.schema import TrainerConfig
from vaekit.shards import split_noise
from vaekit.syncs import checks_are_free
from vaekit.training import rng_state
from vaekit.training.checkpoint import CHECKPOINT_FORMAT, BackgroundSaver, load_weights, save_atomic
from vaekit.training.distributed import World, current
from vaekit.training.ema import EMA
from vaekit.training.epoch_log import EpochLog, epoch_line
from vaekit.training.flatten import FlatParameters
from vaekit.training.guard import StepGuard
from vaekit.training.optimizers import FlatOptimizer
from vaekit.training.precision import Precision
from vaekit.training.profiling import StepProfiler
from vaekit.training.schedule import Schedule, check_schedule_state
from vaekit.training.signals import StopRequest

if TYPE_CHECKING:  # the TensorBoard writer is imported by whoever makes the logger
    from vaekit.loggers.tensorboard import RunLogger

log = logging.getLogger("vaekit")

VALIDATION_SEED = 2024
WATCHED_NAMES = {"nelbo": "NELBO", "iwae": "IWAE bound", "nll": "NLL (AIS)"}  # as train.log names them


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
    sums: Tensor | None = None  # running sums of rec and each level's KL (the names, in order)
    names: tuple[str, ...] = ()
    count: int = 0  # examples done


class Trainer:
    """Fits `model` on `data` with `optimizer`; writes checkpoints and logs into run_dir.

    `stop` is the request that SIGINT/SIGTERM set; `config` (plain data) is saved in every
    checkpoint. `schedule` sets the lr each epoch (default: the optimizer's lr, constant);
    with settings.ema the EMA weights are the ones validated, checkpointed as "model" and tested.
    `world`: this process's place among several (vaekit.training.distributed; default: the
    process group joined, else alone); `precision`: how steps compute (default settings.precision);
    `objective`: the loss and the validation number early stopping watches (default the ELBO).
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
        schedule: Schedule | None = None,
        world: World | None = None,
        precision: Precision | None = None,
        objective: Objective | None = None,
    ) -> None:
        self.world = world if world is not None else current()
        self.precision = precision or Precision(getattr(settings, "precision", "32"), data.device)
        self.model = model
        self.flat = flat
        self.optimizer = optimizer
        self.data = data
        # a plain dataclass: the loop reads its fields every step, and a DictConfig's
        # attribute access costs about 80 us each
        if OmegaConf.is_config(settings):  # a resumed run's node is not typed: merge it into the schema
            values = OmegaConf.to_container(settings, resolve=True)  # interpolations need the root
            settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainerConfig), values))
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
        self.schedule = schedule if schedule is not None else Schedule()
        self.schedule.attach(optimizer)
        self.ema = EMA(flat, settings.ema) if settings.ema is not None else None
        profile_steps = settings.profile_steps if self.world.is_main else 0  # rank 0 writes the trace
        self.profiler = StepProfiler(profile_steps, run_dir / "profile", data.device)
        self.epoch_log = EpochLog()
        self.guard = StepGuard(settings.max_nonfinite_steps, sync_free=False, device=data.device)
        self.lr = float(optimizer.param_groups[0]["lr"])  # the lr of the current epoch
        self.objective = objective if objective is not None else Objective()
        self.saver = BackgroundSaver()  # last.pt and best.pt are written while the next epoch runs

    # ----------------------------------------------------------------- the loop
    def fit(self) -> FitState:
        """Train until early stopping, max_epochs, interruption or divergence.

        Returns the final FitState; raises Interrupted (after writing last.pt) or Diverged.
        """
        s = self.settings
        self.state.status = "running"
        self.good_state = self.checkpoint()
        hidden = not s.progress or not self.world.is_main
        bar = tqdm(total=s.max_epochs, initial=self.state.epoch, desc="train", unit="epoch", disable=hidden)
        # log lines on the console go through tqdm.write, so they do not break the bar
        console = logging_redirect_tqdm() if s.progress else contextlib.nullcontext()
        self.profiler.start()
        try:
            with console:
                while self._should_continue():
                    start = time.perf_counter()
                    try:
                        train_terms = self._train_epoch()
                    except _RollBack:
                        self._roll_back()
                        continue
                    val_terms = self._validate()
                    watched = val_terms[self.objective.stopping_key]  # the validation bound trained
                    improved = self._update_early_stopping(watched, self.state.epoch)
                    self.schedule.observe(self.state.epoch, watched)
                    self._log_epoch(self.state.epoch, train_terms, val_terms, improved, start)
                    self.state.train_seconds += time.perf_counter() - start
                    snapshot = self._save_last(also_best=improved)
                    if math.isfinite(watched):
                        self.good_state = snapshot
                    bar.update(1)
                    bar.set_postfix(val=f"{watched:.2f}", best=f"{self.state.best_val:.2f}")
        except (Interrupted, Diverged):
            self.world.barrier()  # every process stops at the same step, after rank 0 wrote its files
            raise
        finally:
            bar.close()
            self.profiler.close()
            self.saver.wait()  # last.pt and best.pt are complete on disk when fit returns or raises
        self.world.barrier()  # the others read best.pt next: wait until rank 0 has written it
        if self.state.status == "early_stopped":
            st = self.state
            log.info(
                "early stopping after epoch %d: no validation improvement for %d epochs; best epoch %d "
                "(val %s %.2f)",
                st.epoch,
                st.epochs_since_best,
                st.best_epoch,
                WATCHED_NAMES.get(self.objective.stopping_key, self.objective.stopping_key),
                st.best_val,
            )
        return self.state

    def _should_continue(self) -> bool:
        """False once early stopping or max_epochs says so (also right after a resume)."""
        reason = self._stop_reason()
        if reason is not None:
            self.state.status = reason
        return self.state.status == "running"

    def _stop_reason(self) -> str | None:
        """early_stopped or finished when the epochs done so far end the run, else None."""
        st = self.state
        if st.epochs_since_best >= self.settings.patience and st.best_epoch > 0:
            return "early_stopped"
        if st.epoch >= self.settings.max_epochs:
            return "finished"
        return None

    def beta(self) -> float:
        """KL weight of the current epoch's loss: trainer.beta, times a factor that rises linearly
        from 1/W to 1 over W warm-up epochs."""
        warmup = self.settings.kl_warmup_epochs
        factor = 1.0 if warmup <= 0 else min(1.0, (self.state.epoch + 1) / warmup)
        return self.settings.beta * factor

    def _train_epoch(self) -> dict[str, float]:
        """One pass over a permutation (continuing a resumed one); mean train terms per example."""
        self.model.train()
        self._choose_guard_path()
        beta, free_bits, bs = self.beta(), self.settings.free_bits, self.settings.batch_size
        self.lr = self.schedule.apply(self.optimizer, self.state.epoch)  # also on a resumed epoch
        if self.progress is None:
            self.progress = EpochProgress(perm=self.data.permutation(self.generator))
        p = self.progress
        shard = self.world.shard  # None in a lone process
        conditional = getattr(self.model, "conditional", False)  # model.conditional=true: labels too
        for step in range(p.step, self.data.num_train_batches(bs)):
            count = min(bs, self.data.num_train - step * bs)  # examples in the (global) batch
            x = self.data.train_batch(p.perm, step, bs, self.generator, shard)  # this process's rows
            y = self.data.train_labels_batch(p.perm, step, bs, shard) if conditional else None  # x's labels
            with split_noise(count, shard.rows(count) if shard else None), self.precision.nets():
                elbo = self.objective(self.forward, x, beta, free_bits, y=y)
            # each process's share of the batch mean: their gradients sum to the batch's gradient
            loss = elbo.loss.mean() if shard is None else elbo.loss.sum() / count
            self.flat.zero_grad()
            self.precision.backward(loss)
            loss, stop = self._combine(loss)
            ok = self._finite_step(loss)
            if ok is not False:  # True, or the device's flag of a masked step
                self.optimizer.step() if ok is True else self.optimizer.step(ok=ok)
                if self.ema is not None:
                    self.ema.update(None if ok is True else ok)
                self._add_terms(p, elbo, x.shape[0], ok)
            self.precision.update()
            p.step = step + 1
            self.profiler.step()
            if self.guard.must_roll_back:
                raise _RollBack
            if stop:
                self._interrupt()
        self._read_guard()
        if self.guard.must_roll_back:
            raise _RollBack
        self.progress = None
        self.state.epoch += 1
        return self._epoch_means(p)

    def _choose_guard_path(self) -> None:
        """Sync-free steps where reading a flag would stall the device (and the optimizer can
        take a masked step); reading at once where that is free (the CPU)."""
        sync_free = not checks_are_free(self.flat.param) and isinstance(self.optimizer, FlatOptimizer)
        if sync_free != self.guard.sync_free:
            self.guard.poll()
            self.guard.sync_free = sync_free

    def _combine(self, loss: Tensor) -> tuple[Tensor, bool]:
        """With several processes: the gradient summed over them (one all-reduce of the flat
        buffer), the loss summed (so the guard decides alike in each) and whether any was asked
        to stop. Alone: the loss and this process's stop request."""
        if self.world.size == 1:
            return loss, self.stop.requested
        self.world.sum_(self.flat.param.grad)
        if loss.device.type == "cpu":  # one small all-reduce carries both
            stop = torch.tensor(1.0 if self.stop.requested else 0.0)
            both = self.world.sum_(torch.stack([loss.detach().float(), stop]))
            return both[0], bool(both[1] > 0)
        return self.world.sum_(loss.detach().clone()), self.world.any(self.stop.requested)

    def _finite_step(self, loss: Tensor) -> bool | Tensor:
        """Clip the gradient if asked; whether the step may be taken (`StepGuard.check`): a bool,
        or on the sync-free path a flag on the device for a masked step. With fp16 an overflowed
        gradient skips the step without counting as non-finite (vaekit.training.precision)."""
        self.precision.unscale(self.optimizer)
        if self.settings.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_([self.flat.param], self.settings.grad_clip)
        else:
            norm = self.flat.grad_norm()
        grads_finite = self.precision.grads_finite(norm)
        if grads_finite is None:
            return self.guard.check(loss, norm)
        ok = self.guard.check(loss, torch.zeros_like(norm))  # the loss alone: divergence
        if ok is True:
            return bool(grads_finite)
        return ok if ok is False else ok & grads_finite

    @staticmethod
    def _add_terms(p: EpochProgress, elbo: Any, batch: int, ok: bool | Tensor) -> None:
        """Add a taken step's sums of the objective's logged terms (rec and each level's KL for
        the ELBO and IWAE) to the epoch's, masked by the device flag; `_epoch_means` derives the
        NELBO and total KL from them."""
        terms = elbo.logged_terms()  # name -> (B,): rec and kl/<level> for the ELBO's objectives
        batch_sums = torch.stack([term.detach() for term in terms.values()]).sum(1)
        if ok is not True:
            batch_sums = torch.where(ok, batch_sums, 0.0)
            batch = ok.to(torch.int64) * batch
        p.sums = batch_sums if p.sums is None else p.sums + batch_sums
        p.names = p.names or tuple(terms)
        p.count = p.count + batch

    def _epoch_means(self, p: EpochProgress) -> dict[str, float]:
        """Mean train terms per example: nelbo, rec, kl, kl/<level> (the epoch's one host sync),
        over the examples of every process."""
        if p.sums is None:
            return {}
        if self.world.size > 1:
            sums, count = self._global_sums(p)
            p = EpochProgress(perm=p.perm, sums=sums, names=p.names, count=count)
        count = torch.as_tensor(p.count, device=p.sums.device, dtype=p.sums.dtype).view(1)
        *sums, examples = torch.cat([p.sums, count]).tolist()
        if examples == 0:
            return {}
        means = {name: total / examples for name, total in zip(p.names, sums, strict=True)}
        if "rec" not in means:  # an objective without the ELBO's terms (e.g. an RBM's)
            return means
        kl = sum(value for name, value in means.items() if name.startswith("kl/"))
        return {"nelbo": means["rec"] + kl, "rec": means["rec"], "kl": kl, **means}

    def _global_sums(self, p: EpochProgress) -> tuple[Tensor | None, int]:
        """The epoch's running sums and example count added up over every process (float64 in
        transit, so counts stay exact)."""
        if p.sums is None:  # no step kept yet: alike in every process
            return None, 0
        count = torch.as_tensor(p.count, device=p.sums.device, dtype=torch.float64).view(1)
        totals = self.world.sum_(torch.cat([p.sums.double(), count]))
        return totals[:-1].to(p.sums.dtype), int(totals[-1].item())

    def _read_guard(self) -> None:
        """The guard's counters into the fit state (one sync on the sync-free path)."""
        self.guard.poll()
        self.state.nonfinite_in_a_row, self.state.nonfinite_total = self.guard.in_a_row, self.guard.total

    def _validate(self) -> dict[str, float]:
        """Validation NELBO with the same noise every epoch (common random numbers).

        Fixed noise makes epochs comparable, so early stopping reacts to the model and not
        to a lucky draw; forking the RNG keeps validation from shifting the training stream.
        """
        self.model.eval()
        self.world.broadcast_model(self.model, parameters=False)  # BatchNorm's statistics: rank 0's
        with own_rng(self.data.device), self.evaluated_weights():
            torch.manual_seed(VALIDATION_SEED)
            val, shard = self.data.val, self.world.shard
            y = self.data.val_labels if getattr(self.model, "conditional", False) else None
            return self.objective.validation_terms(self.model, val, self.eval_batch_size, shard, y=y)

    def evaluated_weights(self) -> contextlib.AbstractContextManager[None]:
        """Inside it the model holds the weights that are validated and saved as "model": the
        EMA weights with trainer.ema, else its own."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

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
        self._load_model(good, self.run_dir / "last.pt")
        self.optimizer.load_state_dict(good["optimizer"])  # this also restores the old lr...
        self.precision.load_state_dict(good.get("precision"))
        # ...which the schedule replaces: its lowered base times the factor of this epoch
        self.schedule.scale_base(self.settings.rollback_lr_factor)
        lr = self.schedule.apply(self.optimizer, st.epoch)
        st.rollbacks += 1
        self.guard.rolled_back()
        st.nonfinite_in_a_row = 0
        self.progress = None  # the abandoned epoch starts afresh (its number is reused)
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
        snapshot = self.checkpoint()  # in every process: its sums are added up over them
        if self.world.is_main:
            self.saver.wait()  # the epoch's file first, then this one over it
            save_atomic(snapshot, self.run_dir / "last.pt")
        raise Interrupted(
            f"stopped at epoch {self.state.epoch + 1}, step {self.progress.step} "
            f"({self.stop.signal_name}); last.pt holds that state"
        )

    # --------------------------------------------------------------- logging
    def _log_epoch(
        self, epoch: int, train: dict[str, float], val: dict[str, float], improved: bool, start: float
    ) -> None:
        """TensorBoard's scalars (train/lr among them) and grids, and the epoch's train.log line."""
        self.logger.scalars("train", {**train, "lr": self.lr}, epoch)
        self.logger.scalars("val", val, epoch)
        due = epoch - self.last_image_epoch >= self.settings.image_every
        if improved and due and self.settings.log_images:
            self.log_images(epoch)
        seconds = time.perf_counter() - start
        line = epoch_line(epoch, self.settings.max_epochs, train, val, self.lr, seconds, improved)
        self.epoch_log.write(line, epoch, improved, last=self._stop_reason() is not None)

    def log_images(self, step: int) -> None:
        """Sample and reconstruction grids of the evaluated weights (the EMA's with trainer.ema),
        tagged with `step`."""
        with self.evaluated_weights():
            y = self.data.val_labels if getattr(self.model, "conditional", False) else None  # CVAE grids
            self.logger.images(self.model, self.data.val, step, draw=self.settings.images == "sample", y=y)
        self.last_image_epoch = step

    # ----------------------------------------------------------- checkpoints
    def checkpoint(self) -> dict[str, Any]:
        """A snapshot of everything needed to evaluate or resume: weights, optimizer, counters,
        the position inside an unfinished epoch, every RNG stream, the config and the checksums
        of the data splits. Tensors are copies on the CPU, so the file loads on any machine."""
        progress = None
        if self.progress is not None:
            self._read_guard()
            progress = {**asdict(self.progress), "names": list(self.progress.names)}
            if self.world.size > 1:  # the sums over every process: any number of them resumes
                progress["sums"], progress["count"] = self._global_sums(self.progress)
            progress["count"] = int(progress["count"])  # a device tensor on the sync-free path
        raw_model = on_cpu(self.model.state_dict())
        with self.evaluated_weights():
            model = raw_model if self.ema is None else on_cpu(self.model.state_dict())
        return {
            "format": CHECKPOINT_FORMAT,
            "model": model,  # the weights that are evaluated: the EMA's with trainer.ema
            "raw_model": raw_model if self.ema is not None else None,  # the optimizer's, with EMA
            "schedule": self.schedule.state_dict(),
            "optimizer": on_cpu(self.optimizer.state_dict()),
            "fit_state": asdict(self.state),
            "epoch_progress": on_cpu(progress),
            "rng": rng_state.capture(self.generator, self.data.device),  # alike in every process
            "precision": self.precision.state_dict(),  # fp16's loss scale; None otherwise
            "config": self.config,
            "data_checksums": dict(self.data.checksums),
        }

    def restore(self, checkpoint: dict[str, Any], path: Path) -> None:
        """Continue from a checkpoint of this trainer (read from `path`, and checked by
        `check_resumable`): the exact state it was saved in."""
        self._load_model(checkpoint, path)
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as error:
            raise VaekitError(
                f"{path} holds an optimizer state that does not fit this model ({error})."
            ) from error
        if checkpoint.get("schedule") is not None:
            self.schedule.load_state_dict(checkpoint["schedule"])
        else:  # saved before schedules: the restored lr (after any roll-backs) is the base
            self.schedule.attach(self.optimizer)
        known = {f.name for f in fields(FitState)}
        self.state = FitState(**{k: v for k, v in checkpoint["fit_state"].items() if k in known})
        self.guard.load(self.state.nonfinite_in_a_row, self.state.nonfinite_total)
        progress = checkpoint.get("epoch_progress")
        if progress is not None:
            progress = {**progress, "names": tuple(progress["names"])}
            progress["perm"] = progress["perm"].to(self.data.device)
            if progress["sums"] is not None:
                progress["sums"] = progress["sums"].to(self.data.device)
            if progress["names"][:1] == ("nelbo",):  # saved by vaekit 0.1: nelbo, rec, kl, kl/<level>
                keep = [i for i, name in enumerate(progress["names"]) if name == "rec" or "/" in name]
                progress["names"] = tuple(progress["names"][i] for i in keep)
                if progress["sums"] is not None:
                    progress["sums"] = progress["sums"][keep]
            self.progress = EpochProgress(**progress)
            if not self.world.is_main and self.progress.sums is not None:  # rank 0 carries the sums so far
                self.progress.sums, self.progress.count = torch.zeros_like(self.progress.sums), 0
        self.precision.load_state_dict(checkpoint.get("precision"))
        position = (self.state.epoch, self.progress.step if self.progress is not None else 0)
        rng_state.restore(checkpoint["rng"], self.generator, self.data.device, self.settings.seed, position)
        self.last_image_epoch = self.state.epoch

    def _load_model(self, checkpoint: dict[str, Any], path: Path) -> None:
        """The checkpoint's weights: "model", and with trainer.ema that is the average, which
        "raw_model" (the optimizer's weights) then follows into the model."""
        load_weights(self.model, checkpoint["model"], path)
        if self.ema is not None:
            self.ema.reset()
            load_weights(self.model, checkpoint["raw_model"], path)

    def _save_last(self, also_best: bool) -> dict[str, Any]:
        """last.pt every epoch; on improvement the same file is published as best.pt. The
        write runs in the background (`BackgroundSaver`) while the next epoch trains.
        Returns the snapshot that is written (the roll-back target when it is finite)."""
        snapshot = self.checkpoint()
        best = self.run_dir / "best.pt" if also_best else None
        if self.world.is_main:
            self.saver.submit(snapshot, self.run_dir / "last.pt", also=best)
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
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    scheduler, trainer = config.get("scheduler"), config.get("trainer")
    if checkpoint.get("schedule") is not None:  # absent in checkpoints from before schedules
        name = scheduler.get("name") if isinstance(scheduler, dict) else "none"
        schedule_problem = check_schedule_state(checkpoint["schedule"], name)
        if schedule_problem is not None:
            refuse(schedule_problem)
    raw_model = checkpoint.get("raw_model")
    if isinstance(trainer, dict) and trainer.get("ema") is not None and not (
        isinstance(raw_model, dict) and all(isinstance(t, Tensor) for t in raw_model.values())
    ):
        refuse("it was trained with trainer.ema but holds no raw_model weights")
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
