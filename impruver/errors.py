"""Errors that reach users: each names the key, file or record at fault and what would fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


def closest(value: str, choices: Iterable[str], n: int = 1) -> list[str]:
    """The choices nearest to ``value`` by spelling (case-insensitive), best first."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(value.lower(), list(lowered), n=n, cutoff=0.6)
    return [lowered[h] for h in hits]


def choices_hint(value: str, choices: Iterable[str]) -> str:
    """'did you mean X? valid choices: a, b, c' for error messages."""
    choices = sorted(choices)
    near = closest(value, choices)
    listed = ", ".join(choices) if choices else "(none)"
    if near:
        return f"did you mean '{near[0]}'? valid choices: {listed}"
    return f"valid choices: {listed}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration, at a dotted key."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ImpruverError(Exception):
    """Base class for errors that the command line reports without a traceback (exit status 2)."""

    exit_code = 2


class ConfigError(ImpruverError):
    """Every problem found in a configuration, reported at once."""

    def __init__(self, problems: list[Problem], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        where = f" in {self.source}" if self.source else ""
        count = len(self.problems)
        head = f"{count} configuration problem{'s' if count != 1 else ''}{where}:"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


class RegistryError(ImpruverError):
    """A name that no registry holds."""


class DataError(ImpruverError):
    """Input data that cannot be used: names the source, file and line or record."""


class RunError(ImpruverError):
    """A stage that cannot run as planned (missing outputs, a model that cannot be loaded offline, ...)."""
