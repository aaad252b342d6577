"""One exception type for everything a user can get wrong.

The CLI turns a `SmallGPTError` into a one-line `error: ...` message and a non-zero exit, so every
module raises it for bad input instead of letting a traceback reach the user.
"""


class SmallGPTError(Exception):
    """A problem the user can fix: bad input, a missing file, an incompatible checkpoint."""
