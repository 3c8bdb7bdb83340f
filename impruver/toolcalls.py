"""Tool calls: the one place that reads and writes them.

impruver keeps a call as a plain dict ``{"name": str, "arguments": dict | str}`` (``arguments`` stays a string
only when it is not JSON). In a conversation a call is a ``function_call`` turn whose content is the call as
compact JSON (:func:`content_of`); chat templates that take OpenAI-style calls get ``tool_calls`` entries
(:func:`to_template`); the server answers with OpenAI ``tool_calls`` (:func:`to_openai`) and reads them back
(:func:`from_openai`); a model's reply is parsed with :func:`parse_reply`.

Every shape people write a call in is accepted: ``{"name", "arguments"}``, ``{"name", "parameters"}`` (Llama 3),
``{"function_call": {...}}`` (the older OpenAI API), ``{"type": "function", "function": {...}}`` (OpenAI), and
``arguments`` as an object or as a JSON string.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

Call = dict[str, Any]  # {"name": str, "arguments": dict | str}

CALL_ROLE = "function_call"  # impruver's role of a turn that is a call
RESPONSE_ROLE = "function_response"  # ... and of the tool's answer
_ROLE_PREFIX = re.compile(rf"^\s*{CALL_ROLE}\s*\n")  # a reply that writes the call's role first


class ToolCallError(ValueError):
    """A call that cannot be read: no function name, or arguments that are a string but not JSON."""


def arguments_of(arguments: Any, *, name: str = "", strict: bool = True) -> Any:
    """Arguments as a JSON value: a JSON string parsed, ``None`` or an empty string as ``{}``.

    Raises:
        ToolCallError: a string that is not JSON (only when ``strict``; otherwise the string is returned).
    """
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        if not arguments.strip():
            return {}
        try:
            return json.loads(arguments)
        except ValueError:
            if strict:
                raise ToolCallError(f"arguments of '{name}' are not JSON") from None
            return arguments
    return arguments


def unwrap(value: Any) -> dict[str, Any] | None:
    """The ``{name, arguments|parameters}`` object inside any of the accepted wrappings, or None."""
    if not isinstance(value, dict):
        return None
    for key in ("function", "function_call"):
        if isinstance(value.get(key), dict):
            return value[key]
    return value


def make_call(name: Any, arguments: Any, *, strict: bool = True) -> Call:
    """A call from its parts, arguments parsed (see :func:`arguments_of`).

    Raises:
        ToolCallError: no function name, or (``strict``) arguments that are a string but not JSON.
    """
    if not isinstance(name, str) or not name:
        raise ToolCallError("a tool call without a function name")
    return {"name": name, "arguments": arguments_of(arguments, name=name, strict=strict)}


def from_openai(call: Any, *, strict: bool = True) -> Call:
    """A call from an OpenAI ``tool_calls`` entry (or a bare ``{name, arguments}`` / legacy ``function_call``).

    Raises:
        ToolCallError: not an object, no function name, or (``strict``) arguments that are not JSON.
    """
    inner = unwrap(call)
    if inner is None:
        raise ToolCallError("a tool call that is not an object")
    return make_call(inner.get("name"), inner.get("arguments", inner.get("parameters")), strict=strict)


def content_of(call: Call) -> str:
    """The content of a ``function_call`` turn: the call as compact JSON, non-ASCII kept."""
    return json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False)


def parse_content(content: str, *, strict: bool = False) -> Call | None:
    """The call a ``function_call`` turn (or any text) holds as a JSON object with a ``name``, or None.

    Raises:
        ToolCallError: (``strict``) a call whose arguments are a string but not JSON.
    """
    try:
        value = json.loads(content)
    except (TypeError, ValueError):
        return None
    inner = unwrap(value)
    if inner is None or not isinstance(inner.get("name"), str) or not inner["name"]:
        return None
    return make_call(inner["name"], inner.get("arguments", inner.get("parameters")), strict=strict)


def normal_content(content: str) -> str:
    """A function_call turn's text as canonical JSON (:func:`content_of`) when it is a JSON call; else as written.

    Raises:
        ToolCallError: a JSON call whose arguments are a string but not JSON.
    """
    call = parse_content(content, strict=True)
    return content if call is None else content_of(call)


def to_template(call: Call) -> dict[str, Any]:
    """A ``tool_calls`` entry as chat templates take it (transformers' convention: arguments as an object)."""
    return {"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


def to_openai(call: Call, *, call_id: str | None = None) -> dict[str, Any]:
    """An OpenAI API ``tool_calls`` entry: an id, and the arguments as a JSON string."""
    arguments = call["arguments"]
    return {"id": call_id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"],
                         "arguments": arguments if isinstance(arguments, str)
                         else json.dumps(arguments, ensure_ascii=False)}}


def parse_reply(text: str, *, allow_json: bool = True) -> Call | None:
    """A function call in a model's reply: ``function_call\\n{json}`` (the role written by the model) or, when
    ``allow_json``, a reply that is one JSON call (``{"name", "arguments"|"parameters"}``, possibly wrapped).

    A JSON object with a name but no arguments is an answer, not a call, unless the role said it is a call; an
    explicit call whose body is not JSON comes back with its text as the arguments and no name.

    Returns:
        ``{"name": str, "arguments": dict | str}``, or None when the reply is ordinary text.
    """
    explicit = bool(_ROLE_PREFIX.match(text))
    if explicit:
        body = _ROLE_PREFIX.sub("", text, count=1).strip()
    elif allow_json:
        body = text.strip()
    else:
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return {"name": "", "arguments": body} if explicit else None
    inner = unwrap(value)
    if inner is None:
        return None
    name = inner.get("name")
    if not isinstance(name, str) or not ({"arguments", "parameters"} & inner.keys() or explicit):
        return None
    return {"name": name, "arguments": arguments_of(inner.get("arguments", inner.get("parameters")), name=name,
                                                     strict=False)}
