"""Output for people: rich tables and progress bars in a terminal, plain log lines otherwise.

In a run of several processes only the main one (rank 0) logs and shows progress: the other ranks' warnings and
errors still show, prefixed with their rank (``[rank 1]``), and their info lines are dropped.
"""

from __future__ import annotations

import logging
import os
import sys

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape  # messages quote overrides such as train.resume_changes=[train.lr]
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
log = logging.getLogger("impruver")


# Set by every launcher in each process it starts (torchrun / accelerate: RANK; MPI-style: the others).
RANK_ENV = ("RANK", "ACCELERATE_PROCESS_INDEX", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def process_rank() -> int:
    """This process's global rank in a launched group (0 outside one). Read from the environment: no torch."""
    for name in RANK_ENV:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def is_main_process() -> bool:
    return process_rank() == 0


class RankFilter(logging.Filter):
    """On rank 0 everything passes; on other ranks only warnings and errors, prefixed with the rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = process_rank()
        if rank == 0:
            return True
        if record.levelno < logging.WARNING:
            return False
        if not str(record.msg).startswith("[rank "):
            record.msg = f"[rank {rank}] {record.msg}"
        return True


def interactive() -> bool:
    """Whether progress bars make sense: stdout is a terminal (and this is the main process)."""
    return console.is_terminal and is_main_process()


def setup_logging(level: int = logging.INFO) -> None:
    """impruver's log: rich in a terminal, plain timestamped lines otherwise. Hydra is told not to touch it."""
    if log.handlers:
        return
    if console.is_terminal:
        # The same console as the progress bars, so that log lines print above a live bar instead of through it.
        handler: logging.Handler = RichHandler(console=console, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.addFilter(RankFilter())
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def progress() -> Progress:
    """A progress display; in a non-terminal it is silent and callers log plain lines instead."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not interactive(),
    )


def _rank_prefix() -> str:
    rank = process_rank()
    return f"[rank {rank}] " if rank else ""


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {_rank_prefix()}{escape(message)}", markup=True, highlight=False)


def print_warning(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {_rank_prefix()}{escape(message)}", markup=True, highlight=False)
