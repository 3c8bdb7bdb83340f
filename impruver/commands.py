"""The commands impruver tells people to type next, built from the command line that is running, so that each
works as printed: the same config file and the overrides that choose the run, with the stage changed.

    impruver data=my.json                   ->  impruver chat data=my.json / impruver serve data=my.json
    impruver run chat ./my.yaml (untrained) ->  impruver train --config ./my.yaml

It also keeps the record of the last training run started from this folder (``outputs/.last_run.json``), which
``impruver chat`` / ``serve`` / ``export`` / ``eval`` without a recipe of their own use: they talk to what was
trained last, wherever that went.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from impruver.layout import OUTPUTS_ROOT

# Relative to the working folder, beside the default output folders (outputs/<preset>).
LAST_RUN = Path(OUTPUTS_ROOT) / ".last_run.json"
# Stages that use what a run trained; the override prefixes that only shape the training, left out of theirs.
LATER_STAGES = ("chat", "serve", "export", "eval")
OPTIMISATION = ("train.", "eval.")


@dataclass(frozen=True)
class Invocation:
    """What chose the run: a config file (or none) and the overrides as the user typed them."""

    config_file: str | None = None
    overrides: tuple[str, ...] = ()
    pinned: bool = False  # the overrides or the file choose the recipe (else impruver's default: the demo)
    output_dir: str | None = None  # the plan's output folder, added to suggestions when nothing else pins it

    def args(self, stage: str = "main") -> list[str]:
        """The arguments that name this run for ``stage``: all of them, but for a stage that only uses what was
        trained (chat, serve, export, eval) without the optimisation's own settings (``train.max_steps=5``,
        ``eval.questions=...``); plus ``output_dir=`` when impruver chose the recipe (a later run could change
        what a bare `impruver chat` finds). Groups stay: a ``hardware=`` choice can be what makes the plan valid."""
        out = ["--config", self.config_file] if self.config_file else []
        later = stage in LATER_STAGES
        out += [o for o in self.overrides if not (later and o.lstrip("+").startswith(OPTIMISATION))]
        if not self.pinned and self.output_dir and not any(o.startswith("output_dir=") for o in out):
            out.append(f"output_dir={self.output_dir}")
        return out


_current = Invocation()


def set_current(invocation: Invocation) -> None:
    """The command line that is running (set by the CLI before any stage runs)."""
    global _current
    _current = invocation


def current() -> Invocation:
    return _current


def command(stage: str, *extra: str, invocation: Invocation | None = None, output_dir: str | None = None) -> str:
    """``impruver STAGE ARGS EXTRA`` as a shell line for the running (or given) invocation.

    Without a known command line (impruver used as a library) it names the run by ``output_dir`` alone.
    """
    inv = invocation or _current
    if output_dir and not inv.config_file and not inv.overrides and not inv.output_dir:
        inv = Invocation(output_dir=output_dir)
    elif output_dir and not inv.output_dir:
        inv = Invocation(inv.config_file, inv.overrides, inv.pinned, output_dir)
    given = {word.partition("=")[0].lstrip("+~") for word in extra if "=" in word}
    if "output_dir" in given:  # the extra names another folder (a checkpoint): no second output_dir
        inv = Invocation(inv.config_file, inv.overrides, pinned=True)
    args = [a for a in inv.args(stage) if a.partition("=")[0].lstrip("+~") not in given]  # an extra key wins
    words = ["impruver", *([stage] if stage != "main" else []), *args, *extra]
    return " ".join(shlex.quote(w) for w in words)


def next_commands(plan: Any, invocation: Invocation) -> list[tuple[str, str]]:
    """What to run after training ``plan``: (command, what it does), each naming this run."""
    from impruver.components import method_of

    inv = Invocation(invocation.config_file, invocation.overrides, invocation.pinned, plan.output_dir)
    steps = [(command("chat", invocation=inv), "talk to it (--prompt TEXT for one reply)"),
             (command("serve", invocation=inv), "an OpenAI-compatible API on 127.0.0.1:8000")]
    if method_of(plan).adapter:
        steps.append((command("export", invocation=inv), "merge the adapter into a standalone model"))
    return steps


# -- the last run ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LastRun:
    """The last training run started from this working folder."""

    output_dir: str
    overrides: list[str] = field(default_factory=list)
    config_file: str | None = None
    started: float = 0.0


def record_last_run(output_dir: str, invocation: Invocation) -> None:
    """Remember the run that is starting (before it trains, so that a killed run is found too): when it trains
    under ``outputs/``, or an ``outputs/`` folder is already there."""
    from impruver.files import atomic_write_text

    root = LAST_RUN.parent.resolve()
    if not root.is_dir() and root not in Path(output_dir).resolve().parents:
        return  # a run elsewhere (output_dir=/data/x) leaves no outputs/ folder in the working folder
    config_file = str(Path(invocation.config_file).resolve()) if invocation.config_file else None
    record = {"output_dir": output_dir, "overrides": list(invocation.overrides), "config_file": config_file,
              "started": time.time()}
    try:
        atomic_write_text(LAST_RUN, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    except OSError:  # a read-only working folder: nothing to remember, nothing lost
        pass


@contextmanager
def recording_last_run(output_dir: str, invocation: Invocation) -> Iterator[None]:
    """:func:`record_last_run` for the block; when the run fails and leaves no folder behind (it failed before
    writing anything: bad data, a busy folder), the record it replaced is put back, and an ``outputs/`` folder the
    record alone created is removed: a run that never ran is not "the last run", and nothing is left behind."""
    root = LAST_RUN.parent
    had_root = root.is_dir()
    try:
        previous: bytes | None = LAST_RUN.read_bytes()
    except OSError:
        previous = None
    record_last_run(output_dir, invocation)
    try:
        yield
    except BaseException:
        if not Path(output_dir).exists():
            _restore_last_run(previous, remove_root=not had_root)
        raise


def _restore_last_run(previous: bytes | None, *, remove_root: bool) -> None:
    from impruver.files import atomic_write_bytes

    try:
        if previous is not None:
            atomic_write_bytes(LAST_RUN, previous)
            return
        LAST_RUN.unlink(missing_ok=True)
        if remove_root and LAST_RUN.parent.is_dir() and not any(LAST_RUN.parent.iterdir()):
            LAST_RUN.parent.rmdir()
    except OSError:  # a read-only working folder: the record was never written either
        pass


def last_run() -> LastRun | None:
    """The record of the last run, or None (none yet, or unreadable)."""
    try:
        data = json.loads(LAST_RUN.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("output_dir"), str):
        return None
    overrides = data.get("overrides")
    config_file = data.get("config_file")
    return LastRun(output_dir=data["output_dir"],
                   overrides=[str(o) for o in overrides] if isinstance(overrides, list) else [],
                   config_file=config_file if isinstance(config_file, str) else None,
                   started=float(data.get("started") or 0))


def reuse_last_run(overrides: Sequence[str]) -> tuple[str | None, list[str], str] | None:
    """For a later stage that names no recipe: the last run's config file and overrides with ``overrides``
    after them (they win), and a line saying which folder is used. None without a usable record."""
    last = last_run()
    if last is None:
        return None
    config_file = last.config_file if last.config_file and Path(last.config_file).is_file() else None
    kept = [] if last.config_file and config_file is None else last.overrides  # a file gone: the folder alone
    pin = [] if any(o.startswith("output_dir=") for o in overrides) else [f"output_dir={last.output_dir}"]
    note = (f"using {last.output_dir}, what the last run trained (recorded in {LAST_RUN}); "
            f"name another with output_dir=DIR or preset=NAME")
    return config_file, [*kept, *pin, *overrides], note


__all__ = ["Invocation", "LAST_RUN", "LastRun", "command", "current", "last_run", "next_commands",
           "record_last_run", "recording_last_run", "reuse_last_run", "set_current"]
