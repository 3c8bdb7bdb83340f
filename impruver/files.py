"""Writing files so that a crash never leaves half of one: the one home of impruver's file writing.

Writing can fail for reasons outside impruver (a full disk, a read-only or foreign folder, a path through a file):
:func:`make_dir` and :func:`disk_errors` turn those into :class:`~impruver.errors.RunError` messages that say what
to do, instead of tracebacks.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from impruver.errors import RunError

FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, or the user's quota is used up
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)  # permission, or a read-only file system


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a file so that readers see the old one or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 text atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def make_dir(path: str | os.PathLike[str], *, what: str) -> Path:
    """Create a folder the run writes into (``what`` names its setting, e.g. ``output_dir``) and check it is
    writable.

    Raises:
        RunError: the path is (or goes through) a file, cannot be created, or is not writable.
    """
    folder = Path(path)
    fix = f"choose another: {what}=PATH (a folder you can write to)"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunError(f"{what} {folder} is a file, or a path through one, not a folder: {fix}") from None
    except OSError as exc:
        raise RunError(f"{what} {folder} cannot be created ({exc.strerror}): {fix}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RunError(f"{what} {folder} is not writable: {fix}")
    return folder


@contextmanager
def disk_errors() -> Iterator[None]:
    """Turn a full disk or a refused write inside the block into a RunError naming the file and the fix; other
    OSErrors pass (they are impruver's own bugs, and their traceback is wanted)."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or "a file"
        if exc.errno in FULL:
            raise RunError(f"the disk is full: writing {where} failed ({exc.strerror}). Free space on that disk "
                           "or choose output_dir=PATH on another one, then continue with train.resume=auto") from None
        if exc.errno in DENIED:
            raise RunError(f"cannot write {where} ({exc.strerror}): check its permissions, or choose "
                           "output_dir=PATH in a folder you can write to") from None
        raise


__all__ = ["atomic_write_bytes", "atomic_write_text", "disk_errors", "make_dir"]
