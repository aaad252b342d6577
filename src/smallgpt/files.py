"""Writing outputs so that no crash, kill, power loss or full disk leaves a half-written file in view.

Every output is written under a hidden temporary name in its final directory, flushed to disk
(`fsync` of the file and of its directory, so a power loss cannot reorder the rename before the
data), and renamed into place: readers see the old version or the new one, never a mix. Temporaries
of a process that died are named `.NAME.tmp-*`; `remove_temporaries` clears them on the next start.
A failure to write (a full disk, a read-only or vanished directory, a file where a directory should
be) removes the temporary and becomes one `WriteError` line naming the path; whatever was in place
before stays as it was. Outputs get the permissions of a plain `mkdir`/`open` (the umask decides).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from smallgpt.errors import SmallGPTError, os_reason


class WriteError(SmallGPTError):
    """An output that could not be written; `path` says which, `errno` why (where the system said)."""

    def __init__(self, path: Path, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.path, self.errno = Path(path), errno


def os_error_behind(exc: BaseException | None) -> OSError | None:
    """The operating system's error behind a writer's failure, also where a library wrapped it:
    `torch.save` into a Python file raises a RuntimeError whose context is the OSError, and
    safetensors (Rust) only says "... (os error 28)"."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code:
            return OSError(int(code[1]), os.strerror(int(code[1])))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failure of the system to write `path` into a one-line `WriteError`; bugs pass through."""
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        error = os_error_behind(exc)
        if error is None:
            raise
        raise WriteError(path, f"cannot write {path}: {os_reason(error)}", error.errno) from None


def make_dir(path: Path, what: str = "output directory") -> Path:
    """`mkdir -p path`, refusing in one line a file in the way or a place that cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError(path, f"{what} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(path, f"cannot create {what} {path}: {os_reason(exc)}") from None
    return path


def _umask() -> int:
    """The process's umask, which can only be read by setting it (briefly to the strictest useful)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what a plain open() creates: 644 under the usual umask 022


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (the names just created or renamed), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def settle(path: Path) -> None:
    """Give a written file the mode a plain open() gives (safetensors writes a mode-600 temporary and
    renames it) and flush it to disk. A filesystem without modes keeps its own."""
    with contextlib.suppress(OSError):
        os.chmod(path, FILE_MODE)
    fsync_path(path)


def temporary_name(final: Path) -> Path:
    """Where `final` is written before it is renamed into place (the suffix is kept for writers
    that choose a format by it, such as matplotlib)."""
    return final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")


def atomic_write_files(directory: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Call `writers[name](tmp_path)` for each file, flush them all, then rename each into place,
    in order: a failure before the renames replaces none of them (a directory never mixes versions)."""
    directory = make_dir(directory)
    finals = [directory / name for name in writers]
    for final in finals:
        if final.is_dir():
            raise WriteError(final, f"cannot write {final}: a directory of that name is in the way")
    written = []
    try:
        for final, write in zip(finals, writers.values(), strict=True):
            written.append(tmp := temporary_name(final))
            with writing(final):
                write(tmp)
                settle(tmp)
        for final, tmp in zip(finals, written, strict=True):
            with writing(final):
                os.replace(tmp, final)
        with writing(directory):
            fsync_path(directory)
    finally:
        for tmp in written:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def atomic_write_file(final: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, flush it, and rename it to `final`."""
    final = Path(final)
    atomic_write_files(final.parent, {final.name: write})


def atomic_write_text(final: Path, text: str) -> None:
    atomic_write_file(final, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_dir)`, flush every file, and swap tmp_dir in for `final`.

    A directory cannot be renamed over a non-empty one, so the old version moves aside to
    `.NAME.old-PID` first and is put back if the new one cannot take its place; a kill between the
    two renames leaves it there, and `remove_temporaries` puts it back.
    """
    final = Path(final)
    make_dir(final.parent)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        with writing(final):
            shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier failure of this process
            tmp.mkdir()  # not tempfile.mkdtemp: its mode 700 would outlive the rename
            write(tmp)
            for path in tmp.rglob("*"):
                (settle if path.is_file() else fsync_path)(path)
            fsync_path(tmp)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            with contextlib.suppress(OSError):
                old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_temporaries(directory: Path) -> None:
    """Clear what killed writers left in `directory`: unfinished `.NAME.tmp-*` outputs are deleted; a
    `.NAME.old-*` moved aside is deleted if NAME was replaced, and restored if the kill came first."""
    if not directory.is_dir():
        return
    for old in directory.glob(".*.old-*"):
        final = old.with_name(old.name[1:].rsplit(".old-", 1)[0])
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                old.rename(final)
    for tmp in directory.glob(".*.tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
