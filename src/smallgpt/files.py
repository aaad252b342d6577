"""Writing outputs so that no crash, kill or power loss leaves a half-written file where readers look.

Every output is written under a hidden temporary name in its final directory, flushed to disk
(`fsync` of the file and of its directory, so a power loss cannot reorder the rename before the
data), and renamed into place: readers see the old version or the new one, never a mix. Temporaries
of a process that died are named `.NAME.tmp-*`; `remove_temporaries` clears them on the next start.
Failures to write (read-only directory, a file where a directory should be, a full disk) become one
`SmallGPTError` line naming the path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from smallgpt.errors import SmallGPTError, os_reason


def make_dir(path: Path, what: str = "output directory") -> Path:
    """`mkdir -p path`, refusing in one line a file in the way or a place that cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SmallGPTError(f"{what} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SmallGPTError(f"cannot create {what} {path}: {os_reason(exc)}") from None
    return path


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (the names just created or renamed), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_file(final: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, flush it, and rename it to `final` (the suffix is kept for writers
    that choose a format by it, such as matplotlib)."""
    final = Path(final)
    make_dir(final.parent)
    if final.is_dir():
        raise SmallGPTError(f"cannot write {final}: a directory of that name is in the way")
    tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)
    except OSError as exc:
        raise SmallGPTError(f"cannot write {final}: {os_reason(exc)}") from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(final: Path, text: str) -> None:
    atomic_write_file(final, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_dir)`, flush every file, and swap tmp_dir in for `final`.

    A directory cannot be renamed over a non-empty one, so the old version moves aside to
    `.NAME.old-PID` first; a kill between the two renames leaves it there, and `remove_temporaries`
    puts it back.
    """
    final = Path(final)
    make_dir(final.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:
        raise SmallGPTError(f"cannot write {final}: {os_reason(exc)}") from None
    try:
        write(tmp)
        for path in tmp.rglob("*"):
            fsync_path(path)
        fsync_path(tmp)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        fsync_path(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SmallGPTError(f"cannot write {final}: {os_reason(exc)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
