"""The overfit check of `+debug=overfit` (trainer.overfit_check): can the model fit one batch?

A model, loss and optimizer that work drive the NELBO of one repeated training batch far down
within a few hundred steps. One that stays flat points at a bug (a detached loss, a learning
rate of zero, a decoder that ignores z) before hours go into a full run.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from vaekit.data import RawSplits
from vaekit.evaluation.metrics import nelbo_terms
from vaekit.rng import own_rng

log = logging.getLogger("vaekit")

CHECK_SEED = 7  # the binarization and the draws of z of the measurement: the same before and after


class OverfitCheck:
    """The training split's NELBO (nats per example) measured when made and again at `finish`.

    Both measurements see the same data (binarized once with CHECK_SEED for Bernoulli
    likelihoods) and the same draws of z, in eval mode, and leave the global RNG as it was,
    so training takes the same steps with or without the check.
    """

    def __init__(self, model: nn.Module, raw: RawSplits, device: torch.device, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size
        self.device = device
        x = raw.train.float().div_(raw.num_levels - 1)  # (N, C, H, W) in [0, 1], on the CPU
        if model.likelihood.binary_data:
            x = torch.bernoulli(x, generator=torch.Generator().manual_seed(CHECK_SEED))
        self.x: Tensor = x.to(device)
        # a conditional model (model.conditional=true) is measured given the training labels
        self.y: Tensor | None = raw.train_labels.to(device) if getattr(model, "conditional", False) else None
        self.start = self.nelbo()

    @torch.no_grad()
    def nelbo(self) -> float:
        """Mean NELBO of the training split under the model's current weights, one z per example."""
        was_training = self.model.training
        with own_rng(self.device):
            torch.manual_seed(CHECK_SEED)
            self.model.eval()
            try:
                return nelbo_terms(self.model, self.x, self.batch_size, y=self.y)["nelbo"]
            finally:
                self.model.train(was_training)

    def finish(self, epochs: int) -> dict[str, float]:
        """Measure again, log first against last, and return both for metrics.json."""
        end = self.nelbo()
        fell = end < self.start
        level = logging.INFO if fell else logging.WARNING
        verdict = (
            f"fell by {self.start - end:.2f} nats"
            if fell
            else "did not fall: check the learning rate, the loss and the data before a long run"
        )
        log.log(
            level,
            "overfit check: training NELBO %.2f -> %.2f nats per example after %d epochs (%s)",
            self.start,
            end,
            epochs,
            verdict,
        )
        return {"overfit_nelbo_start": self.start, "overfit_nelbo_end": end}
