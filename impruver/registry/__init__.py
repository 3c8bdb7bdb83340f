"""The registries that map names in a plan to builder functions.

Each registry is a catalogue registry, so a third-party package can add to it in two ways:

* per-name entry points in the group ``impruver_<kind>`` (``impruver_formats``, ``impruver_models``, ...),
  loaded lazily when that name is first used; or
* a module in the group ``impruver_plugins`` that registers builders with the decorators below when imported.
  impruver's own built-ins (:mod:`impruver.plugins.builtin`) are registered this way.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import catalogue

from impruver.errors import RegistryError, choices_hint

KINDS = (
    "formats",  # record -> conversations
    "models",  # plan.model -> torch model
    "tokenizers",  # plan.tokenizer -> tokenizer
    "methods",  # full / lora / qlora / scratch: what is trained and how the base is loaded
    "templates",  # chat templates (Jinja source) by name
    "optimizers",  # parameters -> torch optimizer
    "schedulers",  # optimizer -> LR schedule
    "families",  # model families: linear modules, LoRA targets, config from `arch`, parameter shapes
    "strategies",  # distribution strategies: launch arguments, what is sharded, how state is saved
    "objectives",  # training objectives: sft, dpo, ipo, orpo, simpo, kto (the loss, what it needs and costs)
)

formats = catalogue.create("impruver", "formats", entry_points=True)
models = catalogue.create("impruver", "models", entry_points=True)
tokenizers = catalogue.create("impruver", "tokenizers", entry_points=True)
methods = catalogue.create("impruver", "methods", entry_points=True)
templates = catalogue.create("impruver", "templates", entry_points=True)
optimizers = catalogue.create("impruver", "optimizers", entry_points=True)
schedulers = catalogue.create("impruver", "schedulers", entry_points=True)
families = catalogue.create("impruver", "families", entry_points=True)
strategies = catalogue.create("impruver", "strategies", entry_points=True)
objectives = catalogue.create("impruver", "objectives", entry_points=True)

_REGISTRIES: dict[str, catalogue.Registry] = {
    "formats": formats,
    "models": models,
    "tokenizers": tokenizers,
    "methods": methods,
    "templates": templates,
    "optimizers": optimizers,
    "schedulers": schedulers,
    "families": families,
    "strategies": strategies,
    "objectives": objectives,
}

PLUGIN_GROUP = "impruver_plugins"
_plugins_loaded = False
_plugin_errors: dict[str, str] = {}


@dataclass(frozen=True)
class Entry:
    """A registered name and where it comes from."""

    kind: str
    name: str
    provider: str  # the distribution (pip package) that provides it
    loaded: bool  # False for an entry point not imported yet


def load_plugins(force: bool = False) -> dict[str, str]:
    """Import every module of the ``impruver_plugins`` entry-point group once; return load errors by plugin."""
    global _plugins_loaded
    if _plugins_loaded and not force:
        return dict(_plugin_errors)
    _plugins_loaded = True
    for ep in md.entry_points(group=PLUGIN_GROUP):
        try:
            module = importlib.import_module(ep.value)
            if force and ep.value in sys.modules:
                importlib.reload(module)
        except Exception as exc:  # a broken plugin must not break impruver: it is reported by `impruver ls`
            if ep.value.split(".")[0] == __name__.split(".")[0]:
                raise  # impruver's own built-ins failing to import is a bug, never a plugin to skip
            dist = ep.dist.name if ep.dist else ep.name
            _plugin_errors[dist] = f"{type(exc).__name__}: {exc}"
    return dict(_plugin_errors)


def refresh_entry_points() -> None:
    """Re-read installed entry points (catalogue snapshots them at import): for tests and notebooks."""
    catalogue.AVAILABLE_ENTRY_POINTS = md.entry_points()  # type: ignore[attr-defined]
    load_plugins(force=True)


def registry(kind: str) -> catalogue.Registry:
    """The registry of one kind."""
    if kind not in _REGISTRIES:
        raise RegistryError(f"unknown registry kind '{kind}': {choices_hint(kind, KINDS)}")
    return _REGISTRIES[kind]


def _entry_point_providers(kind: str) -> dict[str, str]:
    """Entry-point names of ``kind`` -> their distribution, from the snapshot catalogue's ``get`` reads (taken at
    import, renewed by :func:`refresh_entry_points`): the same names ``lookup`` finds, without scanning every
    installed distribution's metadata on each ``has`` (a few ms, and ``has`` runs in training steps' lookups)."""
    return {
        ep.name: (ep.dist.name if ep.dist else "?")
        for ep in registry(kind)._get_entry_points()  # type: ignore[attr-defined]
    }


def _module_provider(func: Callable[..., Any]) -> str:
    top = (getattr(func, "__module__", "") or "").split(".")[0]
    dists = md.packages_distributions().get(top)
    return dists[0] if dists else top or "?"


def names(kind: str) -> list[str]:
    """Every name registered for ``kind``, entry points included, sorted."""
    load_plugins()
    reg = registry(kind)
    found = set(catalogue._get_all(reg.namespace))  # type: ignore[attr-defined]
    found = {key[-1] for key in found}
    found.update(_entry_point_providers(kind))
    return sorted(found)


def available(kind: str) -> list[Entry]:
    """Every name of ``kind`` with the package that provides it, without importing entry points."""
    load_plugins()
    reg = registry(kind)
    eps = _entry_point_providers(kind)
    entries: dict[str, Entry] = {}
    for key, func in catalogue._get_all(reg.namespace).items():  # type: ignore[attr-defined]
        entries[key[-1]] = Entry(kind, key[-1], _module_provider(func), True)
    for name, dist in eps.items():
        if name not in entries:
            entries[name] = Entry(kind, name, dist, False)
    return [entries[n] for n in sorted(entries)]


def lookup(kind: str, name: str) -> Callable[..., Any]:
    """The builder registered as ``name`` in ``kind``; a RegistryError lists the valid names."""
    load_plugins()
    reg = registry(kind)
    try:
        return reg.get(name)
    except catalogue.RegistryError:
        pass
    raise RegistryError(f"no {singular(kind)} named '{name}': {choices_hint(name, names(kind))}")


def singular(kind: str) -> str:
    """'families' -> 'family', 'methods' -> 'method' (for messages)."""
    return kind[:-3] + "y" if kind.endswith("ies") else kind[:-1]


def has(kind: str, name: str) -> bool:
    """Whether ``name`` is registered for ``kind`` (without importing an entry point's module)."""
    return name in names(kind)


def describe(kind: str, name: str) -> dict[str, Any]:
    """Docstring, file and line of a registered builder, for `impruver ls KIND NAME`."""
    func = lookup(kind, name)
    # A component registered as an instance (methods, families, strategies) is described by its class.
    source = func if inspect.isroutine(func) or inspect.isclass(func) else type(func)
    try:
        file = inspect.getsourcefile(source)
        line = inspect.getsourcelines(source)[1]
    except (TypeError, OSError):
        file, line = None, None
    return {"kind": kind, "name": name, "doc": inspect.getdoc(source) or "", "file": file, "line": line}
