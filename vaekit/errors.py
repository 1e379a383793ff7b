"""User-facing errors: one clear sentence each, shown without a traceback."""


class VaekitError(Exception):
    """A user-facing error: its message is one clear sentence, shown without a traceback."""


class RunStopped(VaekitError):
    """The run ended early (interrupted or diverged) and metrics.json already says so.

    `exit_code` is what the command exits with: 130 / 143 after SIGINT / SIGTERM, 1 otherwise.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def describe_os_error(error: OSError) -> str:
    """An OSError as one sentence naming the file: 'could not use X: No space left on device.'"""
    where = f" {error.filename}" if error.filename else ""
    reason = error.strerror or str(error) or type(error).__name__
    return f"could not use{where}: {reason}."
