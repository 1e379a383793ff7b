"""One line per epoch in train.log (logger "vaekit", which Hydra writes to <run_dir>/train.log),
at a rate a person can read: every one of the first FIRST_EPOCHS epochs, then at most one
every INTERVAL_S seconds, and always the last epoch and every epoch that wrote best.pt.

    epoch 12/1000 | train NELBO 98.61 | val NELBO 97.20 (best) | val KL z 14.05 | lr 0.001 | 0.31 s
"""

from __future__ import annotations

import logging
import math
import time

log = logging.getLogger("vaekit")

FIRST_EPOCHS = 5
INTERVAL_S = 10.0


def epoch_line(
    epoch: int,
    max_epochs: int,
    train: dict[str, float],
    val: dict[str, float],
    lr: float,
    seconds: float,
    improved: bool,
) -> str:
    """The epoch's line: train and val NELBO (and val IWAE bound), the validation KL per level
    (`kl/<level>`), lr, time; "(best)" beside the number early stopping watches."""
    parts = [f"epoch {epoch}/{max_epochs}"]
    if "nelbo" in train:  # absent when every step of the epoch was skipped
        parts.append(f"train NELBO {train['nelbo']:.2f}")
    if "free_energy" in train:  # model=rbm
        parts.append(f"train free energy {train['free_energy']:.2f}")
    if "energy_gap" in train:  # model=ebm: energies of the data and of the SGLD negatives
        parts.append(f"train energy data {train['energy_data']:.3f} gap {train['energy_gap']:.3f}")
    best = " (best)" if improved else ""
    if "nll" in val:  # model=rbm, model=ebm: a short AIS estimate of the validation NLL
        parts.append(f"val NLL (AIS) {val['nll']:.2f}{best}")
    elif "iwae" in val:  # objective=iwae: early stopping watches the validation bound
        parts.append(f"val NELBO {val['nelbo']:.2f}")
        parts.append(f"val IWAE bound {val['iwae']:.2f}{best}")
    else:
        parts.append(f"val NELBO {val['nelbo']:.2f}{best}")
    levels = " ".join(f"{key[3:]} {value:.2f}" for key, value in val.items() if key.startswith("kl/"))
    if levels:
        parts.append(f"val KL {levels}")
    parts.append(f"lr {lr:.3g}")
    parts.append(f"{seconds:.2f} s")
    return " | ".join(parts)


class EpochLog:
    """Decides which epochs get a line, and writes them."""

    def __init__(self) -> None:
        self.last_written = -math.inf  # time.monotonic() of the last line

    def due(self, epoch: int, improved: bool, last: bool, now: float) -> bool:
        """True for the first epochs, the last, an improvement, or after INTERVAL_S quiet seconds."""
        return epoch <= FIRST_EPOCHS or improved or last or now - self.last_written >= INTERVAL_S

    def write(self, line: str, epoch: int, improved: bool, last: bool) -> None:
        now = time.monotonic()
        if self.due(epoch, improved, last, now):
            log.info("%s", line)
            self.last_written = now
