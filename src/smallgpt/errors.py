"""One exception type for everything a user can get wrong, and the helpers that phrase it.

The CLI turns a `SmallGPTError` into a one-line `error: ...` message and a non-zero exit, so every
module raises it for bad input instead of letting a traceback reach the user.
"""


class SmallGPTError(Exception):
    """A problem the user can fix: bad input, a missing file, an incompatible checkpoint."""


def first_line(exc: BaseException) -> str:
    """The gist of a library's error, which may run to many lines (or to none: then its type)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def os_reason(exc: OSError) -> str:
    """'Permission denied', 'Not a directory', ... without the errno prefix and repeated path."""
    return exc.strerror or first_line(exc)
