"""The one exception type acemerge raises for bad input."""


class AceMergeError(Exception):
    """A user-facing error: its message is one line that names the file or parameter."""
