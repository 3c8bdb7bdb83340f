"""One run per output folder: ``<output_dir>/.lock`` holds the pid, host and start time of the run using it.

A second run on a busy folder stops with exit status 2, naming the pid. A lock whose process is dead (on this
host) is taken over with a warning, and the work files that dead run left (:meth:`RunLayout.stale_work`) are
removed, which is safe only because the lock is now ours. The lock is re-entrant within a process (the main job
holds it while its train job takes it again) and is released when the outermost holder ends.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from impruver.errors import RunError
from impruver.files import make_dir
from impruver.layout import RunLayout

log = logging.getLogger("impruver")
_HELD: dict[Path, int] = {}  # run folders this process holds -> nesting depth
YOUNG_S = 5.0  # an empty lock file younger than this is being written by its owner, not left by a dead run


@contextmanager
def run_lock(output_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the run folder's lock (creating the folder) for the block; remove dead runs' work files first.

    Raises:
        RunError: the folder cannot be created or written, or another live run holds it.
    """
    created = [f for f in (Path(output_dir), *Path(output_dir).parents) if not f.exists()]  # made here, deepest first
    root = make_dir(output_dir, what="output_dir")
    key = root.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield root
        finally:
            _HELD[key] -= 1
        return
    lock = RunLayout.of(root).lock
    _acquire(lock)
    _HELD[key] = 1
    failed = True
    try:
        remove_stale_work(root)
        yield root
        failed = False
    finally:
        del _HELD[key]
        _release(lock)
        if failed:  # a run that failed before writing anything leaves no folder behind
            _remove_if_empty(created)


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove these folders (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (the run wrote something), or gone: keep the rest too
            return


def remove_stale_work(root: Path) -> list[Path]:
    """Delete what dead runs left in ``root`` (call only while holding its lock); returns what was removed."""
    removed = RunLayout.of(root).stale_work()
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if removed:
        log.info("removed %d work file(s) left by an earlier run that did not finish: %s", len(removed),
                 ", ".join(str(p.relative_to(root)) for p in removed))
    return removed


def holder(output_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record (pid, host, started) of the live run holding ``output_dir``, or None when no run holds it (no
    lock, or one left by a run that is no longer running): what `impruver chat` asks before saying "in progress"."""
    lock = RunLayout.of(output_dir).lock
    if not lock.is_file():
        return None
    owner = owner_of(lock)
    return owner if owner is not None and _alive(lock, owner) else None


def owner_of(lock: Path) -> dict[str, Any] | None:
    """The lock's record (pid, host, started, ...), or None when it is missing or unreadable."""
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pid_started": process_start(os.getpid())}


def _acquire(lock: Path) -> None:
    for _ in range(3):  # a race with another run taking over the same stale lock: look again
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = owner_of(lock)
            if _alive(lock, owner):
                raise RunError(_busy(lock, owner)) from None
            log.warning("taking over %s, left by a run that is no longer running (%s)", lock, _who(owner))
            lock.unlink(missing_ok=True)
            continue
        except OSError as exc:
            raise RunError(f"cannot create {lock} ({exc.strerror}): choose an output_dir you can write to "
                           "(output_dir=PATH)") from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(_me(), handle)
        return
    raise RunError(f"{lock} keeps being taken by other runs; wait for them, or choose another output_dir")


def _release(lock: Path) -> None:
    owner = owner_of(lock)
    if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


def _alive(lock: Path, owner: dict[str, Any] | None) -> bool:
    """Whether the lock's run may still be running (on another host we cannot tell, so it is)."""
    if owner is None:  # empty or half-written: its owner is writing it now, unless it is old
        try:
            return time.time() - lock.stat().st_mtime < YOUNG_S
        except OSError:
            return False
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False  # our own pid yet not held by this process: left by a process that had this pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    started = owner.get("pid_started")
    return started is None or started == process_start(pid)  # else the pid was reused by an unrelated process


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in parentheses may hold spaces


def _who(owner: dict[str, Any] | None) -> str:
    if owner is None:
        return "an unreadable lock"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"


def _busy(lock: Path, owner: dict[str, Any] | None) -> str:
    return (f"{lock.parent} is in use by another impruver run ({_who(owner)}): wait for it to finish, or choose "
            f"another output_dir=PATH. If that run is gone (another machine, a reused pid), delete {lock}")


__all__ = ["holder", "owner_of", "process_start", "remove_stale_work", "run_lock"]
