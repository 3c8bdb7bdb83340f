"""Output for people: rich tables and progress bars in a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

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


def track(items: Iterable[T], *, total: int | None, description: str, every: int = 0) -> Iterator[T]:
    """Iterate with a progress bar in a terminal, or a log line every ``every`` items (0: none) otherwise."""
    with progress() as bar:
        task = bar.add_task(description, total=total, info="")
        for i, item in enumerate(items, 1):
            yield item
            bar.advance(task)
            if not interactive() and every and i % every == 0:
                log.info("%s: %d/%s", description, i, total if total is not None else "?")


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)


def print_warning(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", markup=True, highlight=False)


def kv_table(title: str, rows: Iterable[tuple[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="cyan")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    return table
