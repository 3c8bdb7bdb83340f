"""Output for people: rich tables and progress bars in a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
log = logging.getLogger("impruver")


def interactive() -> bool:
    """Whether progress bars make sense: stdout is a terminal."""
    return console.is_terminal


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
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def progress() -> Progress:
    """A progress display; in a non-terminal it is silent and callers log plain lines instead."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not interactive(),
    )


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)


def print_warning(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", markup=True, highlight=False)
