"""Reading and writing ``plan.yaml``: what later stages and other processes read back (never the raw config).

A plan records the schema version it was written with; a plan.yaml of another version is refused with the fix
(plan again with this impruver) instead of being half-understood. ``<output_dir>/plan.yaml`` is the record of the
last run: its hash is kept beside it, so a hand edit is noticed by the next run, which keeps the edited file as a
backup and says which keys differ (``impruver train --plan FILE`` runs an edited plan as it is).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from impruver.errors import ConfigError, ImpruverError, Problem
from impruver.files import atomic_write_text
from impruver.layout import PLAN_FILE, RunLayout
from impruver.plan.schema import PLAN_VERSION, Plan, problems_from

log = logging.getLogger("impruver")


def to_yaml(plan: Plan) -> str:
    """The plan as YAML, secrets redacted, in the schema's field order."""
    return yaml.safe_dump(plan.to_dict(), sort_keys=False, allow_unicode=True, width=120)


def write_plan(plan: Plan, folder: str | os.PathLike[str] | None = None) -> Path:
    """Write ``plan.yaml`` into ``folder`` (default: the output dir) atomically; return its path.

    A plan.yaml edited by hand since impruver wrote it (its hash differs from the one kept beside it) is not
    overwritten silently: it is kept as ``plan.edited-<time>.yaml`` with a warning naming the keys that differ.
    """
    layout = RunLayout.of(folder or plan.output_dir)
    text = to_yaml(plan)
    record = folder is None or Path(folder).resolve() == Path(plan.output_dir).resolve()  # the run's own record
    if record:  # (a copy beside an export is no record: it gets no hash file)
        _keep_hand_edits(layout, text)
    atomic_write_text(layout.plan, text)
    if record:
        atomic_write_text(layout.plan_hash, _sha256(text) + "\n")
    return layout.plan


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _keep_hand_edits(layout: RunLayout, text: str) -> Path | None:
    """Back up ``plan.yaml`` if it was edited after impruver wrote it and differs from ``text``; return the copy."""
    try:
        current = layout.plan.read_text(encoding="utf-8")
        written = layout.plan_hash.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None  # no plan yet, or one from an impruver that kept no hash: nothing to compare with
    if _sha256(current) == written or current == text or diff_keys(current, text) == []:
        return None  # untouched, or edited to what this run writes anyway (`impruver train --plan` on it)
    backup = layout.root / f"plan.edited-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
    atomic_write_text(backup, current)
    keys = ", ".join(diff_keys(current, text)) or "formatting only"
    log.warning("%s was edited by hand after the last run wrote it; this run writes its own plan there and keeps "
                "your file as %s (keys that differ: %s). To run the edited plan as it is: impruver train --plan %s",
                layout.plan, backup, keys, backup)
    return backup


def diff_keys(old_text: str, new_text: str) -> list[str]:
    """The dotted keys whose values differ between two plan YAML texts (unparsable text: the key '(whole file)')."""
    old, new = _normalized(old_text), _normalized(new_text)
    if old is None or new is None:
        return ["(whole file)"]
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _normalized(text: str) -> dict[str, Any] | None:
    """A plan text as the schema reads it (`1e-5` and `1.0e-05` alike; defaults filled), else as parsed."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(data, dict):
        return None
    try:
        return Plan.model_validate(data).to_dict()
    except (ValidationError, ImpruverError, ValueError, LookupError, ImportError):
        return data  # not a valid plan: compared as written


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: leaf}; lists are leaves (a changed list is one change)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a ``plan.yaml`` (a file, or the folder holding one) written by :meth:`Plan.write`.

    Raises:
        ConfigError: no plan there, a plan of another schema version, or one that no longer validates.
    """
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_FILE
    if not path.is_file():
        raise ConfigError([Problem("", f"no plan at {path}: run `impruver plan` or a training job first")])
    fix = "fix it, or write it again: `impruver plan --yaml OVERRIDES > plan.yaml`"
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError([Problem("", f"not valid YAML{where} ({reason}): {fix}")], source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem("", f"cannot be read ({exc}): {fix}")], source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([Problem("", f"a plan.yaml holds a mapping of sections: {fix}")], source=str(path))
    version = data.get("version")
    if version != PLAN_VERSION:
        raise ConfigError([Problem("version", f"this plan was written by an impruver with plan version {version!r}; "
                                   f"this one reads version {PLAN_VERSION}: plan the run again with this version "
                                   "(`impruver plan ...` with the same overrides), or use the impruver that wrote it")],
                          source=str(path))
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems_from(exc, Plan), source=str(path)) from None


__all__ = ["load_plan", "to_yaml", "write_plan"]
