"""EMA weights (`trainer.ema=d`): an exponential moving average of all parameters.

After every optimizer step that was taken (a skipped non-finite step changes nothing),

    ema <- d * ema + (1 - d) * param        one lerp_ on the flat parameter vector (P,)

starting from the initial weights. Validation, early stopping, best.pt, the image grids and
the final test use the average: a checkpoint's "model" holds it, and "raw_model" the weights
the optimizer updates, so a resumed run continues both exactly (vaekit/training/trainer.py).
The average remembers about 1 / (1 - d) steps: d = 0.999 suits runs of many thousand steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from vaekit.training.flatten import FlatParameters


class EMA:
    """The moving average of `flat.param` with decay `decay` in (0, 1)."""

    def __init__(self, flat: FlatParameters, decay: float) -> None:
        if not (math.isfinite(decay) and 0 < decay < 1):
            raise ValueError(f"the EMA decay must be in (0, 1), not {decay}")
        self.flat = flat
        self.decay = float(decay)
        self.average = flat.param.detach().clone()  # (P,)

    @torch.no_grad()
    def update(self, taken: Tensor | None = None) -> None:
        """One step of the average towards the current weights. `taken` (a 0-dim bool tensor,
        for a step masked on the device) makes it a step only where the optimizer's was taken,
        without the host reading the flag."""
        if taken is None:
            self.average.lerp_(self.flat.param, 1.0 - self.decay)
        else:
            self.average.lerp_(self.flat.param, taken.to(self.average.dtype) * (1.0 - self.decay))

    @torch.no_grad()
    def reset(self) -> None:
        """Take the current weights as the average (after loading it into the model)."""
        self.average.copy_(self.flat.param)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average inside the block and its own weights again after it
        (copied back bit for bit; the parameter views stay attached)."""
        with torch.no_grad():
            raw = self.flat.param.detach().clone()
            self.flat.param.copy_(self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                self.flat.param.copy_(raw)
