"""The fitting loop: epochs over device-resident data, validation NELBO, early stopping,
atomic checkpoints (best.pt on improvement, last.pt every epoch), non-finite guard, logging.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vaekit.checkpoint import save_atomic
from vaekit.data import DeviceData
from vaekit.errors import VaekitError
from vaekit.flatten import FlatParameters
from vaekit.metrics import nelbo_terms
from vaekit.schema import TrainerConfig
from vaekit.tb_logger import RunLogger

log = logging.getLogger("vaekit")

CHECKPOINT_FORMAT = 1
VALIDATION_SEED = 2024


def fork_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Restore the global RNG streams of the CPU (and this CUDA device) on exit."""
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


@dataclass
class FitState:
    """Counters that early stopping and resumption need; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    best_val: float = math.inf
    best_epoch: int = 0
    epochs_since_best: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    train_seconds: float = 0.0
    status: str = "running"  # running, early_stopped, finished, diverged


class Trainer:
    """Fits `model` on `data` with `optimizer`; writes checkpoints and logs into run_dir."""

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
    ) -> None:
        self.model = model
        self.flat = flat
        self.optimizer = optimizer
        self.data = data
        self.settings = settings
        self.run_dir = run_dir
        self.logger = logger
        self.config = config
        self.state = FitState()
        self.generator = torch.Generator(device=data.device).manual_seed(settings.seed + 1)
        self.forward = torch.compile(model) if settings.compile else model
        self.last_image_epoch = -math.inf

    def fit(self) -> FitState:
        """Train until early stopping, max_epochs or divergence; returns the final FitState."""
        s = self.settings
        epochs = tqdm(
            range(self.state.epoch, s.max_epochs),
            desc="train",
            unit="epoch",
            disable=not s.progress,
            initial=self.state.epoch,
            total=s.max_epochs,
        )
        for epoch in epochs:
            start = time.perf_counter()
            train_terms = self._train_epoch()
            val_terms = self._validate()
            improved = self._update_early_stopping(val_terms["nelbo"], epoch + 1)
            self._log_epoch(epoch + 1, train_terms, val_terms, improved)
            self.state.train_seconds += time.perf_counter() - start
            self._save_last(also_best=improved)
            epochs.set_postfix(val=f"{val_terms['nelbo']:.2f}", best=f"{self.state.best_val:.2f}")
            if self.state.status != "running":
                break
        else:
            self.state.status = "finished"
        epochs.close()
        return self.state

    def beta(self) -> float:
        """KL weight of the coming epoch: rises linearly from 1/W to 1 over W warm-up epochs."""
        warmup = self.settings.kl_warmup_epochs
        return 1.0 if warmup <= 0 else min(1.0, (self.state.epoch + 1) / warmup)

    def _train_epoch(self) -> dict[str, float]:
        """One pass over a fresh permutation; returns mean train NELBO, rec, KL (and per level)."""
        self.model.train()
        beta, free_bits = self.beta(), self.settings.free_bits
        sums: Tensor | None = None
        names: list[str] = []
        count = 0
        for x in self.data.train_batches(self.settings.batch_size, self.generator):
            elbo = self.forward(x, beta=beta, free_bits=free_bits)
            loss = elbo.loss.mean()
            self.flat.zero_grad()
            loss.backward()
            if not self._finite_step(loss):
                continue
            self.optimizer.step()
            terms = [elbo.nelbo, elbo.rec, elbo.kl, *elbo.kl_per_level.values()]
            batch_sums = torch.stack([t.detach().sum() for t in terms])
            sums = batch_sums if sums is None else sums + batch_sums
            names = names or ["nelbo", "rec", "kl", *(f"kl/{k}" for k in elbo.kl_per_level)]
            count += x.shape[0]
        self.state.epoch += 1
        if sums is None:
            return {}
        means = (sums / count).tolist()  # the epoch's one host sync
        return dict(zip(names, means, strict=True))

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
        log.warning(
            "non-finite loss or gradient at epoch %d: step skipped (%d in a row)",
            self.state.epoch + 1,
            self.state.nonfinite_in_a_row,
        )
        if self.state.nonfinite_in_a_row >= self.settings.max_nonfinite_steps:
            raise VaekitError(
                f"Training diverged: {self.state.nonfinite_in_a_row} non-finite steps in a row "
                f"at epoch {self.state.epoch + 1}; best.pt keeps the model of epoch "
                f"{self.state.best_epoch}. Try a lower optimizer.lr or trainer.grad_clip."
            )
        return False

    def _validate(self) -> dict[str, float]:
        """Validation NELBO with the same noise every epoch (common random numbers).

        Fixed noise makes epochs comparable, so early stopping reacts to the model and not
        to a lucky draw; forking the RNG keeps validation from shifting the training stream.
        """
        self.model.eval()
        with fork_rng(self.data.device):
            torch.manual_seed(VALIDATION_SEED)
            return nelbo_terms(self.model, self.data.val, self.settings.eval_batch_size)

    def _update_early_stopping(self, val_nelbo: float, epoch: int) -> bool:
        """Record the epoch's validation NELBO; True when it improved (best.pt is due)."""
        st = self.state
        if not math.isfinite(val_nelbo):
            improved = False
        else:
            improved = val_nelbo < st.best_val - self.settings.min_delta
        if improved:
            st.best_val, st.best_epoch, st.epochs_since_best = val_nelbo, epoch, 0
        else:
            st.epochs_since_best += 1
            if st.epochs_since_best >= self.settings.patience:
                st.status = "early_stopped"
        return improved

    def _log_epoch(self, epoch: int, train: dict[str, float], val: dict[str, float], improved: bool) -> None:
        self.logger.scalars("train", train, epoch)
        self.logger.scalars("val", val, epoch)
        due = epoch - self.last_image_epoch >= self.settings.image_every
        if improved and due and self.settings.log_images:
            self.log_images(epoch)

    def log_images(self, step: int) -> None:
        """Sample and reconstruction grids of the model as it is now, tagged with `step`."""
        with fork_rng(self.data.device):  # image grids must not change the training run
            self.logger.images(self.model, self.data.val, step)
        self.last_image_epoch = step

    def checkpoint(self) -> dict[str, Any]:
        """Everything needed to evaluate or resume: weights, optimizer, counters, RNG, config."""
        rng = {"torch": torch.get_rng_state(), "data": self.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "fit_state": asdict(self.state),
            "rng": rng,
            "config": self.config,
        }

    def _save_last(self, also_best: bool) -> None:
        """last.pt every epoch; on improvement the same file is published as best.pt."""
        best = self.run_dir / "best.pt" if also_best else None
        save_atomic(self.checkpoint(), self.run_dir / "last.pt", also=best)
