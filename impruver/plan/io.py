"""Reading and writing ``plan.yaml``: what later stages and other processes read back (never the raw config).

A plan records the schema version it was written with; a plan.yaml of another version is refused with the fix
(plan again with this impruver) instead of being half-understood.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from impruver.errors import ConfigError, Problem
from impruver.files import atomic_write_text
from impruver.layout import PLAN_FILE
from impruver.plan.schema import PLAN_VERSION, Plan, problems_from


def to_yaml(plan: Plan) -> str:
    """The plan as YAML, secrets redacted, in the schema's field order."""
    return yaml.safe_dump(plan.to_dict(), sort_keys=False, allow_unicode=True, width=120)


def write_plan(plan: Plan, folder: str | os.PathLike[str] | None = None) -> Path:
    """Write ``plan.yaml`` into ``folder`` (default: the output dir) atomically; return its path."""
    target = Path(folder or plan.output_dir) / PLAN_FILE
    atomic_write_text(target, to_yaml(plan))
    return target


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
    data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConfigError([Problem("", "a plan.yaml holds a mapping of sections")], source=str(path))
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
