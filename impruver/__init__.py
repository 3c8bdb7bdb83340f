"""impruver: declarative training of large language models (from scratch, full fine-tuning, LoRA and QLoRA).

The public API is small and imports nothing heavy (no torch) until a stage runs::

    import impruver
    plan = impruver.build_plan(["model=rugpt3large", "method=lora", "dataset=saiga2"])
    print(plan.to_yaml())

(The functions are not named ``compose`` / ``plan``: those are the submodules :mod:`impruver.compose` and
:mod:`impruver.plan`, which would replace them as attributes of the package once imported.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__version__ = "0.1.0"


def compose_config(overrides: Sequence[str] = (), *, config_file: str | None = None) -> Any:
    """Compose impruver's config groups with overrides: :func:`impruver.compose.compose`."""
    from impruver.compose import compose

    return compose(overrides, config_file=config_file)


def build_plan(overrides: Sequence[str] = (), *, config_file: str | None = None) -> Any:
    """Compose and validate into a frozen :class:`impruver.plan.Plan` (raises ConfigError with every problem)."""
    from impruver.compose import plan_job

    return plan_job(overrides, config_file=config_file)


def load_plan(path: str) -> Any:
    """Read a ``plan.yaml`` (or the output folder holding one): :func:`impruver.plan.load_plan`."""
    from impruver.plan import load_plan as _load_plan

    return _load_plan(path)


__all__ = ["__version__", "build_plan", "compose_config", "load_plan"]
