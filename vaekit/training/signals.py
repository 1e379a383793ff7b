"""Graceful stops: the first SIGINT/SIGTERM asks the trainer to stop after the current step;
a second SIGINT stops at once. SIGUSR1/SIGUSR2 (a scheduler's warning before a time limit or a
preemption: SLURM's `--signal`, sent by submitit) stop the same way, and are then passed on to the
handler that was there before (submitit's, which requeues the job; its rerun continues from last.pt)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# submitit's warning signal: USR2 by default, USR1 with SUBMITIT_PREEMPT_SIGNAL=USR1 (`--signal=USR1@90`)
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Set by the signal handlers, polled by the training loop after every step.

    Use as a context manager around training: it installs the handlers on entry (main
    thread only) and restores the previous ones on exit.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}
        self._pass_on: Callable[[int, FrameType | None], object] | None = None  # set by a preemption signal

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        previous = self._previous.get(signum)
        if signum in PREEMPT_SIGNALS and callable(previous):
            self._pass_on = previous
        print(
            f"\nvaekit: {self.signal_name} received: stopping after the current step "
            "(press Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopRequest:
        for signum in (*STOP_SIGNALS, *PREEMPT_SIGNALS):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def pass_on(self) -> None:
        """After a preemption signal, call the handler it would have reached without vaekit
        (submitit's requeues the job and exits); nothing otherwise. Call once last.pt is written."""
        handler, self._pass_on = self._pass_on, None
        if handler is not None:
            message = f"vaekit: {self.signal_name} passed on to the launcher (it requeues the job)"
            print(message, file=sys.stderr, flush=True)
            handler(signal.Signals[self.signal_name].value, None)

    @property
    def exit_code(self) -> int:
        """The shell convention: 128 + signal number (130 SIGINT, 143 SIGTERM, 138 SIGUSR1, 140 SIGUSR2)."""
        return 128 + (signal.Signals[self.signal_name].value if self.signal_name else signal.SIGINT)
