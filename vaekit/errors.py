"""The one exception type that means "the user asked for something we can't do"."""


class VaekitError(Exception):
    """A user-facing error: its message is one clear sentence, shown without a traceback."""
