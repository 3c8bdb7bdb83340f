"""Validate a component's ``options`` against its registered builder's keyword-only parameters."""

from __future__ import annotations

import inspect
from typing import Any

from pydantic import ConfigDict, ValidationError, create_model

from impruver import registry
from impruver.errors import Problem, choices_hint

# Parameters that the run step injects (runtime objects); a config never sets them.
INJECTED = {"record", "plan", "tokenizer", "model", "params", "optimizer", "num_training_steps", "texts", "spec",
            "load"}


def options_model(func: Any) -> type:
    """A pydantic model (extra keys forbidden) of ``func``'s keyword-only, non-injected parameters."""
    fields: dict[str, Any] = {}
    for param in inspect.signature(func).parameters.values():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY or param.name in INJECTED:
            continue
        annotation = Any if param.annotation is inspect.Parameter.empty else param.annotation
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (annotation, default)
    return create_model(  # type: ignore[call-overload]
        f"{getattr(func, '__name__', 'builder')}_options",
        __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
        **fields,
    )


def check_options(kind: str, name: str, options: dict[str, Any], *, key: str) -> list[Problem]:
    """Problems with ``options`` for builder ``name`` of ``kind`` (empty when they fit its signature)."""
    try:
        model = options_model(registry.lookup(kind, name))
    except Exception as exc:  # a plugin that fails to import is a configuration problem, reported with the rest
        return [Problem(key, f"cannot load {kind[:-1]} '{name}': {type(exc).__name__}: {exc}")]
    try:
        model.model_validate(options)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                hint = choices_hint(str(err["loc"][-1]), model.model_fields)
                problems.append(Problem(f"{key}.{loc}", f"{name} takes no option '{err['loc'][-1]}'; {hint}"))
            else:
                problems.append(Problem(f"{key}.{loc}", err["msg"]))
        return problems
    return []
