"""Hydra at the edge: the one module that composes configs (and the only one importing hydra / omegaconf).

One path for every job::

    command line -> check_safe (no code in user configs) -> hydra_overrides (the default preset, replacing
    forms) -> precheck: compose every listed point, plan_from each, all problems at once (exit 2)
    -> hydra.main (Hydra's flags, launchers, sweepers) -> job(cfg): the pre-checked plan, or plan_from for a
    trial that could not be listed (optuna) -> impruver.jobs.run_stage

``compose(overrides)`` is the same composition for tests and notebooks: Hydra composes and applies the
overrides (Hydra's own semantics, so both paths agree); impruver only collects every problem instead of
stopping at the first. Inside the plan's sections Hydra accepts any key an override sets (see
_register_sections) and the plan's schema, the one home of key names and defaults, judges it.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir, initialize_config_module
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from impruver.errors import ConfigError, ImpruverError, Problem, choices_hint

if TYPE_CHECKING:
    from impruver.plan import Plan

CONFIG_MODULE = "impruver.conf"
PRIMARY = "config"
SECTIONS_NODE = "impruver_sections"  # ConfigStore node: the plan's sections as open mappings (see below)
DEFAULT_PRESET = "demo"
GROUPS = ("model", "tokenizer", "dataset", "method", "hardware", "train", "chat", "objective", "preset")
# Groups that change only how or where a run trains, never what: choosing only these keeps the demo preset
# (`impruver hardware=cpu_ddp hardware.num_processes=2` still trains the demo into outputs/demo). Any other
# group (model, tokenizer, dataset, method, preset, or one a plugin adds) names a recipe of its own.
RUN_GROUPS = ("hardware", "train", "chat")
# `data=PATH` / `data=[A,B]`: train on one's own files alone (format detected, outputs/<file stem>).
DATA_KEY = "data"
# Keep Hydra from taking over logging, the working directory or the outputs, whatever the primary config says.
HYDRA_QUIET = ("hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.output_subdir=null",
               "hydra.job.chdir=false")
# Keys through which Hydra (or omegaconf's instantiate) would import and call code named in a config.
INSTANTIATION_KEYS = frozenset({"_target_", "_call_", "_partial_", "_args_", "_recursive_", "_convert_"})
# Hydra settings a user file or override may not set: they run code or add config sources that could.
UNSAFE_HYDRA_KEYS = ("hydra.callbacks", "hydra.searchpath")
# Environment variables that make the next Python (a worker, a launched job) or the loader run other code:
# refused in `hydra.job.env_set`, which Hydra exports into the job's environment.
CODE_ENV = frozenset({"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONINSPECT",
                      "LD_PRELOAD", "LD_LIBRARY_PATH", "DYLD_INSERT_LIBRARIES", "BASH_ENV", "ENV", "PATH"})
# Sweepers whose points the command line can list before anything runs (Hydra's basic sweeper: a=1,2).
LISTABLE_SWEEPERS = ("basic",)
# The value-replacing forms of `dataset.sources`: a mapping (names as given) or a list (names from the stems).
REPLACED_KEYS = ("dataset.sources",)


@dataclass(frozen=True)
class Composed:
    """A composed configuration: plain values, plus which option of each group was chosen."""

    config: dict[str, Any]
    choices: dict[str, str] = field(default_factory=dict)
    source: str | None = None  # the config file, when one was given instead of impruver's primary config
    sweeper: str = "basic"  # the chosen hydra/sweeper option: decides whether a sweep's points can be listed
    # Overrides Hydra refused; kept (with strict=False) so that the plan's own problems are reported with them.
    problems: tuple[Problem, ...] = ()


# -- the plan of one job -----------------------------------------------------------------------------------------


def plan_from(config: dict[str, Any], choices: dict[str, str], *, source: str | None = None) -> Plan:
    """The one step from a composed config to a validated, frozen plan: shared by the pre-check and the job."""
    from impruver.plan import make_plan

    try:
        return make_plan(_normalized(config), choices=choices)
    except ConfigError as exc:
        raise ConfigError(exc.problems, source=source) from None


def _normalized(config: dict[str, Any]) -> dict[str, Any]:
    """``dataset.sources`` as a list (``[{path: a.jsonl, format: openai}]``) becomes a mapping named by each
    item's ``name`` or its file's stem."""
    dataset = config.get("dataset")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("sources"), list):
        return config
    sources: dict[str, Any] = {}
    for item in dataset["sources"]:
        if not isinstance(item, dict):
            raise ConfigError([Problem("dataset.sources", f"list items must be mappings, got {item!r}")])
        item = dict(item)
        name = item.pop("name", None) or Path(str(item.get("path", "source"))).stem
        if name in sources:
            raise ConfigError([Problem("dataset.sources", f"two sources named '{name}': give one a `name:`")])
        sources[str(name)] = item
    return {**config, "dataset": {**dataset, "sources": sources}}


def compose(overrides: Sequence[str] = (), *, config_file: str | None = None) -> Composed:
    """Compose impruver's config (or ``config_file``) with command-line style ``overrides``, as a job gets it.

    Raises ConfigError listing every unsafe key, bad group choice, unparsable or inapplicable override.
    """
    problems = check_safe(overrides, config_file)
    if problems:
        raise ConfigError(problems, source=config_file)
    composed = _compose(hydra_overrides(overrides, config_file=config_file), config_file, strict=False)
    if composed.problems:  # with the plan's own problems, so that all are reported at once
        _plan_or_problems(composed)
    return composed


def _plan_or_problems(composed: Composed) -> Plan:
    """The plan of a composition, or ConfigError with the overrides Hydra refused and the plan's problems."""
    found, plan = list(composed.problems), None
    try:
        plan = plan_from(composed.config, composed.choices, source=composed.source)
    except ConfigError as exc:
        refused = {p.key for p in found}  # a refused override's key is not also a plan problem
        found += [p for p in exc.problems if p.key not in refused]
    if found or plan is None:
        raise ConfigError(found, source=composed.source)
    return plan


def hydra_overrides(overrides: Sequence[str], *, config_file: str | None = None) -> list[str]:
    """The overrides as Hydra gets them: the demo preset when no group but hardware, train or chat is chosen
    (``impruver``, ``impruver hardware=cpu_ddp train.lr=1e-3``); ``data=PATH`` as the sources it stands for (see
    data_overrides); with a config file, a group choice as that option's section (see file_group_overrides);
    and ``dataset.sources=VALUE`` as "delete, then add" so that the value replaces the dataset's sources instead
    of merging into them (Hydra merges mappings)."""
    overrides = data_overrides(overrides, config_file=config_file)
    overrides = file_group_overrides(overrides, config_file)
    parsed, _ = parse_overrides(overrides)
    out = [f"preset={DEFAULT_PRESET}"] if _default_preset_applies(parsed, config_file) else []
    for line in overrides:
        one, problems = parse_overrides([line])
        o = one[0] if one and not problems else None
        if (o is not None and o.key_or_group in REPLACED_KEYS and o.type == OverrideType.CHANGE
                and not o.is_sweep_override() and isinstance(o.value(), (dict, list))):
            out += [f"~{o.key_or_group}", f"+{line}"]
        else:
            out.append(line)
    return out


# -- data=PATH: one's own files, alone ------------------------------------------------------------------------


def data_overrides(overrides: Sequence[str], *, config_file: str | None = None) -> list[str]:
    """``data=PATH`` (repeatable) or ``data=[A,B]``: train on those files alone, keeping the rest of the recipe.

    Becomes ``dataset.sources=[{name, path, format: auto}, ...]`` (replacing the sources: the format of each is
    detected from its records), ``output_dir=outputs/<file stems>`` unless one is given (or the config file
    sets one), ``eval.questions=null`` unless given (the recipe's own question file is about its own data), and
    ``dataset.val_size=null`` unless a validation size is given (a share of the records, ``dataset.val_fraction``,
    instead of a count chosen for the recipe's data). The length limit and dedup stay the recipe's.

    Raises:
        ConfigError: a sweep or a value that is not a path, or ``data=`` together with ``dataset.sources=``.
    """
    parsed, _ = parse_overrides(overrides)
    data = [o for o in parsed if o.get_key_element().lstrip("+") == DATA_KEY]
    if not data:
        return list(overrides)
    problems, paths = [], []
    for o in data:
        value = None if o.is_sweep_override() or o.is_delete() else o.value()
        items = value if isinstance(value, list) else [value]
        if o.is_sweep_override():
            problems.append(Problem(DATA_KEY, f"'{o.input_line}' is a sweep; to train on several files at once "
                                    f"give a list: data=[{','.join(o.sweep_string_iterator())}]"))
        elif not items or not all(isinstance(i, str) and i for i in items):
            problems.append(Problem(DATA_KEY, f"'{o.input_line}': give a file (data=chats.jsonl) or a list of "
                                    "files (data=[a.jsonl,b.json])"))
        else:
            paths += items
    keys = {o.get_key_element().lstrip("+~") for o in parsed}
    if "dataset.sources" in keys or any(k.startswith("dataset.sources.") for k in keys):
        problems.append(Problem(DATA_KEY, "give either data=PATH (your files, format detected) or "
                                "dataset.sources=..., not both"))
    if problems:
        raise ConfigError(problems, source=config_file)
    names = _source_names(paths)
    sources = [{"name": name, "path": path, "format": "auto"} for name, path in zip(names, paths)]
    lines = [f"dataset.sources={hydra_literal(sources)}"]
    if "output_dir" not in keys and not _file_sets(config_file, "output_dir"):
        lines.append(f"output_dir={hydra_literal(os.path.join('outputs', '+'.join(names)))}")
    if "eval.questions" not in keys:
        lines.append("eval.questions=null")
    if not keys & {"dataset.val_size", "dataset.val_fraction"}:
        lines.append("dataset.val_size=null")  # a share of the records (val_fraction), not the demo's fixed 64
    first = overrides.index(data[0].input_line)
    kept = [line for line in overrides if line not in {o.input_line for o in data}]
    return [*kept[:first], *lines, *kept[first:]]


def _source_names(paths: Sequence[str]) -> list[str]:
    """A source name per path: its file's stem (``chats`` for ``data/chats.jsonl``), made unique with -2, -3."""
    names: list[str] = []
    for path in paths:
        stem = Path(path.rstrip("/")).stem or "data"
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return names


def _file_sets(config_file: str | None, key: str) -> bool:
    """Whether a config file gives a top-level ``key`` a value (not null)."""
    if not config_file:
        return False
    try:
        data = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get(key) is not None


def hydra_literal(value: Any) -> str:
    """``value`` in Hydra's override grammar: strings quoted (any characters: spaces, Cyrillic, quotes),
    mappings and lists written out; ``parse_overrides`` of the result gives ``value`` back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(hydra_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {hydra_literal(v)}" for k, v in value.items()) + "}"
    text = str(value)
    # Inside quotes Hydra reads a backslash literally, except in a run just before a quote (or the closing
    # quote), where each pair stands for one backslash: double those runs, then escape the quotes.
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'") + "'"


# -- a config file plus a group choice -----------------------------------------------------------------------


def file_group_overrides(overrides: Sequence[str], config_file: str | None) -> list[str]:
    """With a config file, ``method=lora`` replaces the file's ``method`` section by impruver's ``lora`` option,
    the fix impruver's own messages suggest (a file from ``impruver cp`` has every section, no defaults list).

    A group the file's own ``defaults:`` list names is left to Hydra. Unknown options are reported with the
    valid ones.
    """
    if not config_file:
        return list(overrides)
    listed = _file_defaults(config_file)
    out: list[str] = []
    problems: list[Problem] = []
    for line in overrides:
        one, bad = parse_overrides([line])
        o = one[0] if one and not bad else None
        group = o.get_key_element().lstrip("+") if o is not None else ""
        if (o is None or group not in GROUPS or group == "preset" or group in listed or o.is_delete()
                or o.is_sweep_override()):
            out.append(line)
            continue
        options = list_options(group)
        if o.value() not in options:
            problems.append(Problem(group, f"no {group} option '{o.value()}'; {choices_hint(str(o.value()), options)}"))
            continue
        out += [f"~{group}", f"+{group}={hydra_literal(option_content(group, str(o.value())))}"]
    if problems:
        raise ConfigError(problems, source=config_file)
    return out


def option_content(group: str, option: str) -> dict[str, Any]:
    """The section that impruver's ``group=option`` composes to (its own defaults merged), unresolved."""
    with _initialized(None):
        cfg = hydra_compose(PRIMARY, overrides=[*hydra_settings(), f"{group}={option}"])
    return OmegaConf.to_container(cfg[group], resolve=False)


def _file_defaults(config_file: str) -> set[str]:
    """The groups a config file's ``defaults:`` list chooses (``- method: lora``, ``- override /method: lora``)."""
    try:
        data = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return set()
    entries = data.get("defaults") if isinstance(data, dict) else None
    found = set()
    for entry in entries if isinstance(entries, list) else []:
        for key in entry if isinstance(entry, dict) else ():
            found.add(str(key).removeprefix("override ").lstrip("/").split("@")[0])
    return found


def plan_job(overrides: Sequence[str] = (), *, config_file: str | None = None) -> Plan:
    """Safety check, compose and plan one job (``impruver plan``, :func:`impruver.build_plan`)."""
    problems = check_safe(overrides, config_file)
    if problems:
        raise ConfigError(problems, source=config_file)
    checked = precheck(hydra_overrides(overrides, config_file=config_file), config_file, multirun=False)
    return checked.plans[0][2]


def _compose(overrides: Sequence[str], config_file: str | None, *, strict: bool = True) -> Composed:
    """Compose already-rewritten overrides (see hydra_overrides); every problem at once.

    With ``strict=False`` the overrides Hydra refused come back in ``Composed.problems`` instead of raising, so
    that the caller reports them together with the plan's.
    """
    with _initialized(config_file):
        parsed, problems = parse_overrides(overrides)
        groups = [o for o in parsed if _is_group(o)]
        values = [o for o in parsed if not _is_group(o)]
        problems += [p for o in groups if (p := _check_choice(o)) is not None]
        problems += [Problem(o.key_or_group, f"'{o.input_line}' is a sweep: add -m (multirun) to run every value")
                     for o in values if o.is_sweep_override()]
        if problems:
            raise ConfigError(problems, source=config_file)
        try:
            cfg = hydra_compose(_primary_name(config_file), return_hydra_config=True,
                                overrides=[*hydra_settings(), *(o.input_line for o in groups)])
        except (HydraException, OmegaConfBaseException) as exc:
            raise ConfigError([Problem("", _one_line(exc))], source=config_file) from None
    problems += _apply_values(cfg, values)
    problems += _composed_hydra_problems(cfg)
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
               if k in GROUPS and v is not None}
    sweeper = str(cfg.hydra.runtime.choices.get("hydra/sweeper") or "basic")
    try:
        config = user_config(cfg)
    except OmegaConfBaseException as exc:
        problems.append(Problem("", _one_line(exc)))
        config = {}
    if problems and (strict or not config):
        raise ConfigError(problems, source=config_file)
    return Composed(config=config, choices=choices, source=config_file, sweeper=sweeper, problems=tuple(problems))


def _apply_values(cfg: DictConfig, values: Sequence[Override]) -> list[Problem]:
    """Hydra's own application of the value overrides (as hydra.main does it, in order), one at a time, so
    that every refused one is reported instead of the first."""
    problems = []
    for o in values:
        try:
            ConfigLoaderImpl._apply_overrides_to_config([o], cfg)
        except (HydraException, OmegaConfBaseException, ValueError, TypeError) as exc:
            problems.append(_override_problem(cfg, o, exc))
    return problems


def user_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed config without Hydra's own node, resolved, as plain values."""
    cfg = copy.copy(cfg)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def parse_overrides(overrides: Sequence[str]) -> tuple[list[Override], list[Problem]]:
    """Parse each override on its own, so that every syntax error is reported, not just the first."""
    parser = OverridesParser.create()
    parsed, problems = [], []
    lines, i = list(overrides), 0
    while i < len(lines):
        line = lines[i]
        try:
            parsed.extend(parser.parse_overrides([line]))
        except HydraException as exc:
            rest = _split_off(lines, i)  # the words the shell split off an unquoted value with spaces
            hint = _quoting_hint(parser, " ".join([line, *rest]))
            problems.append(Problem(line.split("=")[0], f"cannot parse '{line}': {_one_line(exc)}{hint}"))
            i += len(rest) if hint else 0
        i += 1
    return parsed, problems


def _split_off(lines: Sequence[str], i: int) -> list[str]:
    """The words after ``lines[i]`` (a ``key=value`` Hydra refused) that hold no ``=``: the rest of a value
    with spaces that the shell split into several words."""
    if "=" not in lines[i]:
        return []
    rest = list(itertools.takewhile(lambda w: "=" not in w and not w.startswith(("+", "~", "-")), lines[i + 1:]))
    return rest


def _quoting_hint(parser: OverridesParser, line: str) -> str:
    """How to write a value Hydra's lexer refused unquoted (a path with Cyrillic letters, spaces, brackets):
    quoted for Hydra, and the whole override quoted for the shell. Empty when quoting would not help."""
    import shlex

    key, eq, value = line.partition("=")
    if not eq or value[:1] in ("'", '"'):
        return ""
    fixed = f"{key}={hydra_literal(value)}"
    try:
        parser.parse_overrides([fixed])
    except HydraException:
        return ""
    for_shell = f'"{fixed}"' if not re.search(r'["$`\\!]', fixed) else shlex.quote(fixed)
    split = " (the shell split the value at its spaces)" if " " in value else ""
    return (f"; values with spaces, non-Latin letters or other special characters must be quoted for Hydra, "
            f"and the whole override for the shell{split}: {for_shell}")


def expand_sweeps(overrides: Sequence[str]) -> list[list[str]]:
    """Every combination of a basic multirun's sweep overrides (``a=1,2 b=x,y``) as plain override lists."""
    parsed, problems = parse_overrides(overrides)
    if problems:
        raise ConfigError(problems)
    axes: list[list[str]] = []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def list_options(group: str, *, config_file: str | None = None) -> list[str]:
    """Every option of a config group, nested ones as ``sub/name`` (presets: ``ruGPT-3.5/13B_lora_saiga2``)."""
    with _initialized(config_file):
        return _options(group, _primary_name(config_file))


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


def hydra_settings() -> list[str]:
    """Overrides impruver always gives Hydra: quiet, plus installed plugins' config packages on the search path."""
    from impruver.plugins import conf_sources

    sources = list(conf_sources())
    return [*HYDRA_QUIET, *([f"hydra.searchpath=[{','.join(sources)}]"] if sources else [])]


# -- config files and overrides cannot run code --------------------------------------------------------------


def check_safe(overrides: Sequence[str], config_file: str | None = None) -> list[Problem]:
    """Instantiation keys (``_target_`` ...) and code-running Hydra settings in a user's config file or
    overrides, each named. Checked on the raw text before Hydra composes anything."""
    problems: list[Problem] = []
    if config_file:
        path = Path(config_file)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            return [Problem("--config", f"cannot read {path}: {_one_line(exc)}")]
        problems += [Problem(key, why) for key, why in _unsafe_keys(data)]
        if (path.parent / "hydra").is_dir():
            problems.append(Problem("--config", f"{path.parent / 'hydra'} would be searched for Hydra's own "
                                    "config groups (launchers, sweepers: code); keep config files elsewhere"))
    parsed, _ = parse_overrides(overrides)
    for o in parsed:
        key = o.get_key_element().lstrip("+~")
        value = None if o.is_sweep_override() or o.is_delete() else o.value()
        tree: Any = value
        for part in reversed(key.split(".")):
            tree = {part: tree}
        problems += [Problem(k, f"{why} (override '{o.input_line}')") for k, why in _unsafe_keys(tree)]
    return problems


def _unsafe_keys(tree: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(tree, list):
        for i, item in enumerate(tree):
            yield from _unsafe_keys(item, f"{prefix}[{i}]")
        return
    if not isinstance(tree, dict):
        return
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key in INSTANTIATION_KEYS:
            yield path, "instantiation keys are not allowed in configs: they import and call code"
        elif path in UNSAFE_HYDRA_KEYS and not _contains_instantiation(value):
            yield path, ("not allowed in configs: it runs or finds code; launchers and sweepers are chosen by "
                         "group name (hydra/launcher=joblib)")
        elif prefix == "hydra.job.env_set" and str(key).upper() in CODE_ENV:
            yield path, "not allowed in configs: this variable makes the job's processes load other code"
        else:
            yield from _unsafe_keys(value, path)


def _contains_instantiation(tree: Any) -> bool:
    if isinstance(tree, dict):
        return any(k in INSTANTIATION_KEYS or _contains_instantiation(v) for k, v in tree.items())
    return isinstance(tree, list) and any(_contains_instantiation(v) for v in tree)


def _composed_hydra_problems(cfg: DictConfig) -> list[Problem]:
    """The composed Hydra node calls only trusted code: no callbacks, and a launcher and a sweeper whose class
    is one that an installed Hydra plugin registered (chosen by group name, never a class path)."""
    problems = [Problem(k, why) for k, why in _unsafe_keys(
        {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"})]
    if cfg.hydra.get("callbacks"):
        problems.append(Problem("hydra.callbacks", "not allowed: impruver runs no config-named callbacks"))
    for group in ("launcher", "sweeper"):
        target = OmegaConf.select(cfg, f"hydra.{group}._target_")
        if target is not None and target not in _trusted_targets(group):
            problems.append(Problem(f"hydra.{group}._target_", f"'{target}' is not a {group} of an installed "
                                    f"Hydra plugin; choose one by name: hydra/{group}=NAME"))
    return problems


def _trusted_targets(group: str) -> set[str]:
    """The launcher (sweeper) classes of Hydra and its installed plugins: the only ones a config may name."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher
    from hydra.plugins.sweeper import Sweeper

    kind = {"launcher": Launcher, "sweeper": Sweeper}[group]
    return {f"{cls.__module__}.{cls.__name__}" for cls in Plugins.instance().discover(kind)}


# -- the plan's sections as open mappings -----------------------------------------------------------------------


def _register_sections() -> None:
    """The plan's sections, empty and open, as the first node of the primary config (``impruver_sections``).

    Hydra sets its composed config to struct mode, which refuses an override of a key no YAML file names
    (``train.report_to=[wandb]`` where no file sets it) unless it is written ``+key``/``++key``. impruver's key
    names are decided by one authority, the plan's schema (with the closest valid key, all at once): inside the
    sections Hydra adds what an override sets and the plan judges it. The node holds no values, so defaults
    stay where they are (the schema, and the YAML options), and a YAML ``???`` still means "required".
    """
    from impruver.plan import Plan

    sections = [name for name, info in Plan.model_fields.items()
                if name in (*GROUPS, "eval", "export") and _model_of(info.annotation)]
    node = OmegaConf.create({name: {} for name in sections})
    for name in sections:
        OmegaConf.set_struct(node[name], False)  # an explicit flag on the node wins over the root's struct mode
    ConfigStore.instance().store(name=SECTIONS_NODE, node=node)


def _model_of(annotation: Any) -> Any:
    """The pydantic model in an annotation (``LoraSpec | None`` -> LoraSpec), or None."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for candidate in (annotation, *(typing.get_args(annotation) if optional else ())):
        if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
            return candidate
    return None


# -- the job Hydra runs ------------------------------------------------------------------------------------------


@dataclass
class Precheck:
    """Plans validated before Hydra starts, found again by their composed config (validation once per job)."""

    plans: list[tuple[dict[str, Any], dict[str, str], Plan]] = field(default_factory=list)
    listable: bool = True

    def plan(self, config: dict[str, Any], choices: dict[str, str], source: str | None) -> Plan:
        for known, known_choices, plan in self.plans:
            if known == config and known_choices == choices:
                return plan
        return plan_from(config, choices, source=source)  # a trial the command line could not list (optuna)


def precheck(overrides: Sequence[str], config_file: str | None, *, multirun: bool) -> Precheck:
    """Compose and plan every job a command would run (each point of a listable sweep); all problems at once.

    For a sweeper whose points cannot be listed (optuna's ``interval(...)``), the fixed overrides are
    checked here and each trial when it starts.
    """
    base = _compose_or_problems(overrides, config_file)
    listable = not multirun or base.sweeper in LISTABLE_SWEEPERS
    if not multirun:
        points: list[list[str]] = []  # the one job is the base itself
    elif listable:
        points = expand_sweeps(overrides)
    else:
        points = []  # each trial is planned when it starts; here the fixed overrides (the base) are checked
    result = Precheck(listable=listable)
    problems: list[Problem] = []
    for point in points or [None]:
        try:
            composed = base if point is None else _compose(point, config_file, strict=False)
            result.plans.append((composed.config, composed.choices, _plan_or_problems(composed)))
        except ConfigError as exc:
            problems += [p for p in exc.problems if p not in problems]
    if problems:
        raise ConfigError(problems, source=config_file)
    return result


def _compose_or_problems(overrides: Sequence[str], config_file: str | None) -> Composed:
    """The composition of the non-sweep part (to learn the sweeper); problems of sweeps come per point."""
    parsed, problems = parse_overrides(overrides)
    if problems:
        raise ConfigError(problems, source=config_file)
    return _compose([o.input_line for o in parsed if not o.is_sweep_override()], config_file, strict=False)


def make_job(stage: str, flags: dict[str, Any], checked: Precheck, config_file: str | None,
             run: Callable[..., Any]) -> Callable[[DictConfig], Any]:
    """The function Hydra calls per job: the plan (pre-checked, or validated now for an unlisted trial), then
    ``run(stage, plan, overrides, **flags)``. Returns the sweep objective (eval loss, else train loss)."""

    def impruver_job(cfg: DictConfig) -> float | None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from impruver.ui import print_error

        hydra_cfg = HydraConfig.get()
        choices = {k: v for k, v in OmegaConf.to_container(hydra_cfg.runtime.choices).items()
                   if k in GROUPS and v is not None}
        sweep_job = hydra_cfg.mode == RunMode.MULTIRUN
        overrides = list(hydra_cfg.overrides.task)
        try:
            config = OmegaConf.to_container(cfg, resolve=True)
            plan = checked.plan(config, choices, config_file)
            if sweep_job:  # each point trains into its own folder; the composed data stays shared
                plan = plan.model_copy(update={"output_dir": hydra_cfg.runtime.output_dir})
            result = run(stage, plan, overrides, **flags)
        except ImpruverError as exc:
            print_error(str(exc))
            if not sweep_job:
                sys.exit(exc.exit_code)
            # A bad trial is reported and recorded; the sweep goes on (a NaN objective: optuna marks it failed).
            _record_failure(hydra_cfg.runtime.output_dir, overrides, exc)
            return math.nan
        return objective(result)

    return impruver_job


def objective(result: Any) -> float | None:
    """What a sweeper minimises: the eval loss of the kept model, or the last train loss without an eval."""
    if not isinstance(result, dict):
        return None
    for key in ("eval_loss", "train_loss"):
        value = result.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return math.nan


def _record_failure(output_dir: str, overrides: list[str], exc: ImpruverError) -> None:
    from impruver.files import atomic_write_text
    from impruver.layout import RunLayout

    record = {"overrides": overrides, "output_dir": output_dir, "exit_code": exc.exit_code, "error": str(exc)}
    atomic_write_text(RunLayout.of(output_dir).run_summary, json.dumps(record, indent=2, ensure_ascii=False))


def run_hydra(job: Callable[[DictConfig], Any], *, config_file: str | None, argv: Sequence[str]) -> None:
    """Hand ``argv`` (Hydra's flags and the overrides) to ``hydra.main``, which composes and calls ``job``."""
    import hydra

    config_path, config_name = f"pkg://{CONFIG_MODULE}", PRIMARY
    if config_file:
        config_path, config_name = str(Path(config_file).parent.resolve()), Path(config_file).stem
    saved = sys.argv
    sys.argv = ["impruver", *argv]
    try:
        hydra.main(config_path=config_path, config_name=config_name, version_base="1.3")(job)()
    finally:
        sys.argv = saved


def completion_line(line: str, stages: Sequence[str]) -> str:
    """COMP_LINE as Hydra's completion expects it: the program, then overrides (a stage word dropped)."""
    words = line.split(" ")
    if len(words) > 2 and words[1] in stages:
        del words[1]
    return " ".join(words)


# -- helpers ---------------------------------------------------------------------------------------------------


class _initialized:
    """Initialize Hydra's global state for one composition and clear it afterwards."""

    def __init__(self, config_file: str | None) -> None:
        self.config_file = config_file

    def __enter__(self) -> None:
        GlobalHydra.instance().clear()
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


def _primary_name(config_file: str | None) -> str:
    return Path(config_file).stem if config_file else PRIMARY


def _options(group: str, primary: str = PRIMARY) -> list[str]:
    loader = GlobalHydra.instance().config_loader()
    # With the primary config and impruver's settings, so that plugins' config packages are searched too.
    settings = {"config_name": primary, "overrides": hydra_settings()}
    found = list(loader.get_group_options(group, results_filter=ObjectType.CONFIG, **settings))
    for sub in loader.get_group_options(group, results_filter=ObjectType.GROUP, **settings):
        found.extend(f"{sub}/{name}" for name in _options(f"{group}/{sub}", primary))
    return sorted(set(found))


def _default_preset_applies(parsed: Sequence[Override], config_file: str | None) -> bool:
    """No config file and no group chosen but those that change only how it runs (`impruver`, `impruver
    train.lr=1e-3`, `impruver hardware=cpu_ddp`): the demo preset."""
    chosen = {o.get_key_element().lstrip("+~") for o in parsed if _is_group(o)}
    return not config_file and not any(g in GROUPS and g not in RUN_GROUPS for g in chosen)


def default_preset_applies(overrides: Sequence[str], config_file: str | None = None) -> bool:
    """Whether ``overrides`` leave the choice of recipe to impruver: no config file, no ``data=``, no group
    that changes what is trained (the command line then gets the demo preset, or the last run's for chat)."""
    parsed, _ = parse_overrides(overrides)
    return (_default_preset_applies(parsed, config_file)
            and not any(o.get_key_element().lstrip("+") == DATA_KEY for o in parsed))


def _is_group(o: Override) -> bool:
    key = o.get_key_element().lstrip("+~")
    whole_section = not o.is_sweep_override() and not o.is_delete() and isinstance(o.value(), (dict, list))
    return "@" not in key and (key in GROUPS or key.startswith("hydra/")) and not whole_section


def _check_choice(o: Override) -> Problem | None:
    key = o.get_key_element().lstrip("+~")
    if o.is_delete():
        return None
    options = _options(key)
    values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
    for value in values:
        if value is None or (isinstance(value, str) and value in options):
            continue
        return Problem(key, f"no {key} option '{value}'; {choices_hint(str(value), options)}")
    return None


def _override_problem(cfg: DictConfig, o: Override, exc: BaseException) -> Problem:
    """A failed override in words: an unknown key names the keys that exist there."""
    key = o.key_or_group
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if isinstance(node, DictConfig) and leaf not in node and not o.is_delete():
        known = [str(k) for k in node.keys() if parent or k != "hydra"] or _schema_keys(parent)
        if not parent:  # the plan has no keys of one's own at the top level: the fix is the closest key
            return Problem(key, _top_level_hint(o, known))
        hint = choices_hint(leaf, known)
        return Problem(key, f"unknown key; {hint} (to add a key of your own: +{o.input_line.lstrip('+')})")
    return Problem(key, _one_line(exc))


def _top_level_hint(o: Override, known: Sequence[str]) -> str:
    """An unknown top-level key (``metod=lora``): the override with the closest key or group (``method=lora``),
    then the keys and groups there are."""
    from impruver.errors import closest

    names = sorted({*known, *GROUPS, DATA_KEY})
    near = closest(o.key_or_group, names)
    listed = f"top-level keys and groups: {', '.join(names)}"
    if not near:
        return f"unknown key; {listed}"
    _, _, value = o.input_line.partition("=")
    return f"unknown key; did you mean {near[0]}={value}? {listed}"


def _schema_keys(path: str) -> list[str]:
    """The field names of the plan's schema at a dotted path (``method.lora``: r, alpha, ...), or none."""
    from impruver.plan import Plan

    model: Any = Plan
    for part in path.split("."):
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            return []
        model = _model_of(info.annotation)
    return list(getattr(model, "model_fields", {}))


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 or lines[0].endswith(".") else f"{lines[0]} {lines[1]}"


_register_sections()

__all__ = ["Composed", "Precheck", "check_safe", "completion_line", "compose", "expand_sweeps", "hydra_overrides",
           "list_options", "make_job", "objective", "option_providers", "parse_overrides", "plan_from", "plan_job",
           "precheck", "run_hydra"]
