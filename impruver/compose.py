"""Hydra at the edge: compose config groups and overrides into a plain dict. The only module importing Hydra.

``compose(overrides)`` is the one path shared by the command line, tests and notebooks. Unlike Hydra's own
override handling, which stops at the first bad override, it checks every group choice and override syntax and
reports them all at once (as a ConfigError); key names and value types are checked afterwards by the plan.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from impruver.errors import ConfigError, Problem, choices_hint

CONFIG_MODULE = "impruver.conf"
PRIMARY = "config"
DEFAULT_PRESET = "demo"
GROUPS = ("model", "tokenizer", "dataset", "method", "hardware", "train", "chat", "preset")
# Keep Hydra from taking over logging, the working directory or the outputs, whatever the primary config says.
HYDRA_QUIET = ("hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.output_subdir=null",
               "hydra.job.chdir=false")


def hydra_settings() -> list[str]:
    """Overrides impruver always gives Hydra: quiet, plus installed plugins' config packages on the search path."""
    from impruver.plugins import conf_sources

    sources = list(conf_sources())
    return [*HYDRA_QUIET, *([f"hydra.searchpath=[{','.join(sources)}]"] if sources else [])]


@dataclass(frozen=True)
class Composed:
    """A composed configuration: plain values, plus which option of each group was chosen."""

    config: dict[str, Any]
    choices: dict[str, str] = field(default_factory=dict)
    source: str | None = None  # the config file, when one was given instead of impruver's primary config
    # Keys that overrides set although the YAML does not name them (defaults live in the plan's schema):
    # Hydra needs them as `++key=value`.
    added_keys: frozenset[str] = frozenset()


def compose(overrides: Sequence[str] = (), *, config_file: str | None = None) -> Composed:
    """Compose impruver's config (or ``config_file``) with command-line style ``overrides``.

    Raises ConfigError listing every bad group choice, unparsable override and missing value.
    """
    with _initialized(config_file):
        parsed, problems = parse_overrides(overrides)
        group_overrides = [o for o in parsed if _is_group(o)]
        if _default_preset_applies(parsed, config_file):
            group_overrides += parse_overrides([f"preset={DEFAULT_PRESET}"])[0]
        value_overrides = [o for o in parsed if not _is_group(o)]
        problems += [p for o in group_overrides if (p := _check_choice(o)) is not None]
        if problems:
            raise ConfigError(problems, source=config_file)
        config_name = Path(config_file).stem if config_file else PRIMARY
        try:
            cfg = hydra_compose(config_name, overrides=[*hydra_settings(), *(o.input_line for o in group_overrides)],
                                return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as exc:
            raise ConfigError([Problem("", _one_line(exc))], source=config_file) from None
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
               if not k.startswith("hydra") and k in GROUPS and v is not None}
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.set_struct(cfg, False)
    added = frozenset(o.key_or_group for o in value_overrides
                      if not o.is_delete() and OmegaConf.select(cfg, o.key_or_group, default=_ABSENT) is _ABSENT)
    problems = [p for o in value_overrides if (p := _apply(cfg, o)) is not None]
    try:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as exc:
        problems.append(Problem("", _one_line(exc)))
        config = {}
    if problems:
        raise ConfigError(problems, source=config_file)
    return Composed(config=config, choices=choices, source=config_file, added_keys=added)


def parse_overrides(overrides: Sequence[str]) -> tuple[list[Override], list[Problem]]:
    """Parse each override on its own, so that every syntax error is reported, not just the first."""
    parser = OverridesParser.create()
    parsed, problems = [], []
    for line in overrides:
        try:
            parsed.extend(parser.parse_overrides([line]))
        except HydraException as exc:
            problems.append(Problem(line.split("=")[0], f"cannot parse '{line}': {_one_line(exc)}"))
    return parsed, problems


def for_hydra(overrides: Sequence[str], added_keys: frozenset[str], *, config_file: str | None = None) -> list[str]:
    """Overrides as Hydra's app must get them: keys absent from the YAML become ``++key=value``, and with no
    group chosen at all (``impruver``, ``impruver train.lr=1e-3``) the demo preset is selected, as in compose()."""
    parsed, _ = parse_overrides(overrides)
    out = [f"preset={DEFAULT_PRESET}"] if _default_preset_applies(parsed, config_file) else []
    for o in parsed:
        plain = o.input_line and not o.input_line.startswith(("+", "~"))
        out.append(f"++{o.input_line}" if plain and o.key_or_group in added_keys else o.input_line)
    return out


def expand_sweeps(overrides: Sequence[str]) -> list[list[str]]:
    """Every combination of a multirun's sweep overrides (``a=1,2 b=x,y``) as plain override lists."""
    parsed, problems = parse_overrides(overrides)
    if problems:
        raise ConfigError(problems)
    axes: list[list[str]] = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def list_options(group: str, *, config_file: str | None = None) -> list[str]:
    """Every option of a config group, nested ones as ``sub/name`` (presets: ``ruGPT-3.5/13B_lora_saiga2``)."""
    with _initialized(config_file):
        return _options(group)


# -- helpers ---------------------------------------------------------------------------------------------------


_ABSENT = object()
_primary: contextvars.ContextVar[str] = contextvars.ContextVar("impruver_primary_config", default=PRIMARY)


class _initialized:
    """Initialize Hydra's global state for one composition and clear it afterwards."""

    def __init__(self, config_file: str | None) -> None:
        self.config_file = config_file

    def __enter__(self) -> None:
        GlobalHydra.instance().clear()
        self._token = _primary.set(Path(self.config_file).stem if self.config_file else PRIMARY)
        if self.config_file:
            path = Path(self.config_file)
            if not path.is_file():
                raise ConfigError([Problem("--config", f"no config file at {path}")])
            self._ctx = initialize_config_dir(str(path.parent.resolve()), version_base="1.3")
        else:
            self._ctx = initialize_config_module(CONFIG_MODULE, version_base="1.3")
        self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)
        GlobalHydra.instance().clear()
        _primary.reset(self._token)


def option_providers(group: str) -> dict[str, str]:
    """The package providing each option of ``group``: impruver, or the plugin whose config package has it."""
    from importlib.resources import files

    from impruver.plugins import conf_sources

    providers = {option: "impruver" for option in list_options(group)}
    for path, dist in conf_sources().items():
        root = files(path.removeprefix("pkg://"))
        for option in providers:
            if root.joinpath(group, f"{option}.yaml").is_file():
                providers[option] = dist
    return providers


def _options(group: str) -> list[str]:
    loader = GlobalHydra.instance().config_loader()
    # With the primary config and impruver's settings, so that plugins' config packages are searched too.
    settings = {"config_name": _primary.get(), "overrides": hydra_settings()}
    found = list(loader.get_group_options(group, results_filter=ObjectType.CONFIG, **settings))
    for sub in loader.get_group_options(group, results_filter=ObjectType.GROUP, **settings):
        found.extend(f"{sub}/{name}" for name in _options(f"{group}/{sub}"))
    return sorted(set(found))


def _default_preset_applies(parsed: Sequence[Override], config_file: str | None) -> bool:
    """No group chosen and no config file (`impruver`, `impruver train.lr=1e-3`): the demo preset."""
    return not config_file and not any(_is_group(o) and o.key_or_group in GROUPS for o in parsed)


def _is_group(o: Override) -> bool:
    key = o.get_key_element().lstrip("+~")
    return "@" not in key and (key in GROUPS or key.startswith("hydra/"))


def _check_choice(o: Override) -> Problem | None:
    key = o.get_key_element().lstrip("+~")
    if o.is_delete() or key.startswith("hydra/"):
        return None
    options = _options(key)
    values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
    for value in values:
        if value is None or (isinstance(value, str) and value in options):
            continue
        return Problem(key, f"no {key} option '{value}'; {choices_hint(str(value), options)}")
    return None


def _apply(cfg: DictConfig, o: Override) -> Problem | None:
    key = o.key_or_group
    if o.is_sweep_override():
        return Problem(key, f"'{o.input_line}' is a sweep: add -m (multirun) to run every value")
    try:
        if o.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is None or leaf not in node:
                return Problem(key, "cannot delete: no such key")
            del node[leaf]
        else:
            OmegaConf.update(cfg, key, o.value(), merge=True, force_add=True)
    except (OmegaConfBaseException, ValueError, TypeError) as exc:
        return Problem(key, _one_line(exc))
    return None


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 or lines[0].endswith(".") else f"{lines[0]} {lines[1]}"


__all__ = ["Composed", "compose", "expand_sweeps", "for_hydra", "list_options", "option_providers",
           "parse_overrides"]
