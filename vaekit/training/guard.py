"""The non-finite step guard: a step whose loss or gradient is not finite is skipped, and
`limit` such steps in a row ask for a roll-back.

Where reading a value back is free (the CPU, `vaekit.syncs.checks_are_free`) the flag is read
at once and a bad step never reaches the optimizer. Elsewhere the host does not wait for it
every step: the optimizer takes a masked step (`FlatOptimizer.step(ok=flag)`, unchanged where
the flag is False), the counters stay on the device, and the host reads them every POLL_EVERY
steps and at the end of the epoch, one sync each. A roll-back then comes up to POLL_EVERY steps
late; it returns to the same last good state, so only those steps' time is lost.
"""

from __future__ import annotations

import torch
from torch import Tensor

POLL_EVERY = 50  # steps between the sync-free path's reads of its counters


class StepGuard:
    """Counts non-finite steps; `check` returns whether a step may be kept (a bool, or a
    0-dim bool tensor on the sync-free path), `must_roll_back` whether `limit` were in a row."""

    def __init__(self, limit: int, sync_free: bool, device: torch.device) -> None:
        self.limit = limit
        self.sync_free = sync_free
        self.in_a_row = 0  # host counters, as of the last read on the sync-free path
        self.total = 0
        self.worst = 0  # longest run of bad steps since the last roll-back decision
        zeros = torch.zeros(3, dtype=torch.int64, device=device)
        self._device_counts = zeros  # [run, worst run, bad steps] since the last read
        self._since_poll = 0

    def load(self, in_a_row: int, total: int) -> None:
        """Continue from a checkpoint's counters."""
        self.in_a_row, self.total, self.worst = in_a_row, total, in_a_row
        counts = torch.tensor([in_a_row, 0, 0], dtype=torch.int64)
        self._device_counts = counts.to(self._device_counts.device)
        self._since_poll = 0

    def check(self, loss: Tensor, grad_norm: Tensor) -> bool | Tensor:
        """Whether this step is finite: read at once, or as a flag on the device."""
        finite = torch.isfinite(loss.detach() + grad_norm)
        if not self.sync_free:
            if bool(finite):
                self.in_a_row = 0
                return True
            self.in_a_row += 1
            self.total += 1
            self.worst = max(self.worst, self.in_a_row)
            return False
        bad = (~finite).to(torch.int64)
        run, worst, count = self._device_counts.unbind()
        run = (run + bad) * bad
        self._device_counts = torch.stack([run, torch.maximum(worst, run), count + bad])
        self._since_poll += 1
        if self._since_poll >= POLL_EVERY:
            self.poll()
        return finite

    def poll(self) -> None:
        """Read the device counters into the host ones (one sync); nothing on the CPU path."""
        if not self.sync_free or self._since_poll == 0:
            return
        run, worst, count = self._device_counts.tolist()
        self.in_a_row, self.worst, self.total = run, max(self.worst, worst), self.total + count
        # the device's run goes on (it continues the host's); worst and count start a new window
        self._device_counts[1:].zero_()
        self._since_poll = 0

    @property
    def must_roll_back(self) -> bool:
        """`limit` non-finite steps in a row, as of the last read."""
        return self.worst >= self.limit

    def rolled_back(self) -> None:
        """A roll-back happened: the run of bad steps is over."""
        self.poll()
        self.in_a_row = self.worst = 0
        self._device_counts = torch.zeros_like(self._device_counts)
