"""impruver: declarative training of large language models (from scratch, full fine-tuning, LoRA and QLoRA).

The public API is small and imports nothing heavy:

    from impruver import compose, make_plan
    plan = make_plan(**compose(["model=rugpt3large", "method=lora", "dataset=saiga2"]).__dict__)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def compose(overrides: list[str] | tuple[str, ...] = (), *, config_file: str | None = None) -> Any:
    """Compose impruver's config groups with overrides (see :func:`impruver.compose.compose`)."""
    from impruver.compose import compose as _compose

    return _compose(overrides, config_file=config_file)


def plan(overrides: list[str] | tuple[str, ...] = (), *, config_file: str | None = None) -> Any:
    """Compose and validate into a :class:`impruver.plan.Plan`."""
    from impruver.plan import make_plan

    composed = compose(overrides, config_file=config_file)
    return make_plan(composed.config, choices=composed.choices)


def make_plan(config: dict[str, Any], *, choices: dict[str, str] | None = None) -> Any:
    from impruver.plan import make_plan as _make_plan

    return _make_plan(config, choices=choices)
