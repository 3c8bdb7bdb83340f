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


# How libraries that write through their own I/O say an OS error: safetensors' Rust ("os error 28"), torch.save's
# C++ stream writer, which drops the errno ("file write failed", or "unexpected pos" when a short write went unseen).
_LIBRARY_FULL = ("os error 28", "os error 122", "no space left on device", "disk quota exceeded", "storagefull")
_LIBRARY_TOO_LARGE = ("os error 27", "file too large")
_TORCH_WRITER = ("pytorchstreamwriter failed writing", "file write failed", "inline_container.cc")
_RESUME = "then continue with train.resume=auto"


@contextmanager
def disk_errors(where: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """Turn a full disk or a refused write inside the block into a RunError naming the file and the fix; other
    OSErrors pass (they are impruver's own bugs, and their traceback is wanted). Writes that libraries make with
    their own I/O (safetensors, ``torch.save``) fail as their own exception types; those are recognised too.

    Args:
        where: the folder being written (the output dir), named in messages where the library gives no path.
    """
    try:
        yield
    except OSError as exc:
        at = exc.filename or "a file"
        if exc.errno in FULL:
            raise RunError(_disk_full(at, exc.strerror)) from None
        if exc.errno == errno.EFBIG:
            raise RunError(_too_large(at, exc.strerror)) from None
        if exc.errno in DENIED:
            raise RunError(f"cannot write {at} ({exc.strerror}): check its permissions, or choose "
                           "output_dir=PATH in a folder you can write to") from None
        raise
    except Exception as exc:
        message = library_write_failure(exc, where)
        if message is None:
            raise
        raise RunError(message) from None


def library_write_failure(exc: BaseException, where: str | os.PathLike[str] | None = None) -> str | None:
    """The user's message for a write that safetensors or torch.save failed, or None when ``exc`` is not one."""
    if not (isinstance(exc, RuntimeError) or type(exc).__name__ == "SafetensorError"):
        return None
    text = str(exc).lower()
    folder = f"under {where}" if where is not None else "in the output folder"
    first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if any(k in text for k in _LIBRARY_FULL):
        return _disk_full(f"a file {folder}", first_line)
    if any(k in text for k in _LIBRARY_TOO_LARGE):
        return _too_large(f"a file {folder}", first_line)
    if any(k in text for k in _TORCH_WRITER):
        free = _free_space(where)
        return (f"torch.save could not write a file {folder} ({first_line}); torch hides the reason, which is "
                f"nearly always a full disk{free} or a file size limit (`ulimit -f`). Free space or choose "
                f"output_dir=PATH on another disk, {_RESUME}")
    return None


def _disk_full(what: str, reason: str) -> str:
    return (f"the disk is full: writing {what} failed ({reason}). Free space on that disk or choose output_dir=PATH "
            f"on another one, {_RESUME}")


def _too_large(what: str, reason: str) -> str:
    return (f"writing {what} failed: file too large ({reason}), the file system's or this process's file size limit "
            f"(`ulimit -f`). Raise the limit or choose output_dir=PATH on another disk, {_RESUME}")


def _free_space(where: str | os.PathLike[str] | None) -> str:
    """' (0.2 GiB free there now)', or '' when it cannot be measured."""
    import shutil

    folder = Path(where) if where is not None else Path.cwd()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return f" ({shutil.disk_usage(folder).free / 2**30:.1f} GiB free there now)"
    except OSError:
        return ""


__all__ = ["atomic_write_bytes", "atomic_write_text", "disk_errors", "library_write_failure", "make_dir"]
