"""One writer per run directory: an OS-level lock that dies with its process."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import IO

from vaekit.errors import VaekitError

LOCK_NAME = ".lock"


class RunLock:
    """Hold an exclusive `flock` on `<run_dir>/.lock` while a process writes the run.

    The kernel releases the lock when the process ends, however it ends (SIGKILL included),
    so a lock is never stale. A second writer is refused at once with one sentence naming the
    process that holds the directory.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self._handle: IO[str] | None = None

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise VaekitError(
                f"{self.run_dir} is in use by another vaekit process (pid {holder}): wait for it "
                f"to finish, or train into another directory."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
