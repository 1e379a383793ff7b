"""Graceful stops: the first SIGINT/SIGTERM asks the trainer to stop after the current step;
a second SIGINT stops at once."""

from __future__ import annotations

import signal
import sys
from types import FrameType, TracebackType


class StopRequest:
    """Set by the signal handlers, polled by the training loop after every step.

    Use as a context manager around training: it installs the handlers on entry (main
    thread only) and restores the previous ones on exit.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(
            f"\nvaekit: {self.signal_name} received: stopping after the current step "
            "(press Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopRequest:
        for signum in (signal.SIGINT, signal.SIGTERM):
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

    @property
    def exit_code(self) -> int:
        """The shell convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (signal.Signals[self.signal_name].value if self.signal_name else signal.SIGINT)
