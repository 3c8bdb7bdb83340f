"""impruver's canonical conversation, and the checks every converted record goes through.

A conversation is a plain dict (cheap to build, pickle and hash in worker processes)::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
     "tools": [...] | None}                      # function schemas, JSON-schema dicts

Roles: ``system``, ``user``, ``assistant``, ``function_call`` (a tool call the model makes: content is a JSON
object ``{"name": ..., "arguments": {...}}``) and ``function_response`` (the tool's answer). An assistant or
function_call message may carry ``reasoning`` (a chain of thought shown before its content), and ``"train": False``
to keep it out of the loss (a weight of 0 in the source, or the source's roles_to_train / train_on_last_turn_only).

Raw text for pretraining is ``{"text": "..."}``: no template, every token trained.
"""

from __future__ import annotations

import json
from typing import Any

from impruver import toolcalls

ROLES = ("system", "user", "assistant", toolcalls.CALL_ROLE, toolcalls.RESPONSE_ROLE)
TRAINABLE_ROLES = frozenset({"assistant", toolcalls.CALL_ROLE})

Conversation = dict[str, Any]
Message = dict[str, Any]


class RecordError(Exception):
    """A record that cannot be used. ``reason`` is a short code counted in the report (``unknown_role``...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SkipRecord(Exception):
    """A record the format deliberately leaves out (e.g. labelled ``bad_output``): counted, never an error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def text_of(content: Any, where: str) -> str:
    """Content as text: a string, or a list of text parts (``{"type": "text", "text"|"value": ...}``).

    Raises:
        RecordError: for images, audio or any other non-text part, or a value that is not text at all.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                value = part.get("text", part.get("value"))
                if not isinstance(value, str):
                    raise RecordError("non_text_content", f"{where}: a text part without a string 'text'")
                pieces.append(value)
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RecordError("non_text_content", f"{where}: content part of type '{kind}' is not text")
        return "".join(pieces)
    raise RecordError("non_text_content", f"{where}: content is {type(content).__name__}, not text")


def function_call_content(call: Any, where: str) -> str:
    """The canonical content of a function_call turn (``{"name": ..., "arguments": {...}}`` as compact JSON) for
    a call in any shape :func:`impruver.toolcalls.from_openai` reads (a JSON string of one too).

    Raises:
        RecordError: ``bad_function_call`` for a call without a name, arguments that are not JSON, or a string
            that is not a JSON object.
    """
    if isinstance(call, str):
        try:
            call = json.loads(call)
        except ValueError:
            raise RecordError("bad_function_call", f"{where}: a tool call that is not JSON") from None
    try:
        return toolcalls.content_of(toolcalls.from_openai(call))
    except toolcalls.ToolCallError as exc:
        raise RecordError("bad_function_call", f"{where}: {exc}") from None


def parse_tools(tools: Any, where: str) -> list[dict[str, Any]] | None:
    """Function schemas from a ``tools`` column: a list of dicts, a JSON string of one, or nothing."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise RecordError("bad_tools", f"{where}: the tools column is not valid JSON") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("bad_tools", f"{where}: tools must be a list of function schemas")
    # OpenAI style ({"type": "function", "function": {...}}) is what tool-aware templates expect.
    return [t if "function" in t else {"type": "function", "function": t} for t in tools] or None


def validate(conversation: Conversation, where: str) -> Conversation:
    """Check a converted conversation; return it unchanged.

    Raises:
        RecordError: empty conversation, unknown role, non-text or empty content, or no assistant /
            function_call turn to train on.
    """
    if "text" in conversation:
        if not isinstance(conversation["text"], str) or not conversation["text"].strip():
            raise RecordError("empty_text", f"{where}: no text")
        return conversation
    messages = conversation.get("messages")
    if not messages:
        raise RecordError("empty_conversation", f"{where}: the conversation has no messages")
    trainable = False
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise RecordError("unknown_role", f"{where}: message {i} has role {role!r}; impruver knows "
                                              f"{', '.join(ROLES)} (map other names in the format)")
        if not isinstance(message.get("content"), str):
            raise RecordError("non_text_content", f"{where}: message {i} ({role}) has no text content")
        if not message["content"].strip() and role != "system":
            raise RecordError("empty_message", f"{where}: message {i} ({role}) is empty")
        trainable = trainable or (role in TRAINABLE_ROLES and message.get("train", True))
    if not trainable:
        raise RecordError("no_assistant_turn", f"{where}: no assistant or function_call turn to train on")
    return conversation


def with_system(conversation: Conversation, system: str | None) -> Conversation:
    """Add a system prompt to a conversation that has none (sources' ``system`` setting)."""
    if not system or "text" in conversation:
        return conversation
    messages = conversation["messages"]
    if messages and messages[0]["role"] == "system":
        return conversation
    return {**conversation, "messages": [{"role": "system", "content": system}, *messages]}


def select_trained(conversation: Conversation, roles: frozenset[str] | None = None,
                   last_turn_only: bool = False) -> Conversation:
    """The conversation with ``"train": False`` on the model's messages that are not to be trained: those whose
    role is not in ``roles`` and, with ``last_turn_only``, all but the last turn (the last run of the model's
    messages: an answer with its calls).

    Raises:
        RecordError: ``no_assistant_turn`` when nothing is left to train on.
    """
    if "text" in conversation or (roles is None and not last_turn_only):
        return conversation
    messages = [dict(m) for m in conversation["messages"]]
    for message in messages:
        if roles is not None and message["role"] in TRAINABLE_ROLES and message["role"] not in roles:
            message["train"] = False
    if last_turn_only:
        end = max((i for i, m in enumerate(messages) if m["role"] in TRAINABLE_ROLES), default=-1)
        start = end
        while start > 0 and messages[start - 1]["role"] in TRAINABLE_ROLES:  # the whole last turn: text and calls
            start -= 1
        for message in messages[:start]:
            if message["role"] in TRAINABLE_ROLES:
                message["train"] = False
    if not any(m["role"] in TRAINABLE_ROLES and m.get("train", True) for m in messages):
        raise RecordError("no_assistant_turn", "nothing left to train on after roles_to_train / "
                                               "train_on_last_turn_only")
    return {**conversation, "messages": messages}


def plain_text(conversation: Conversation) -> str:
    """The words of a conversation, roles included, for deduplication."""
    if "text" in conversation:
        return conversation["text"]
    parts = [f"{m['role']}: {m['content']}" for m in conversation["messages"]]
    return "\n".join(parts)
