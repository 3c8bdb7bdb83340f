"""Record formats: each turns one record into one or more conversations in impruver's canonical form.

A format is ``func(record, **options) -> list[Conversation]`` registered under a name (``dataset.sources.X.format``);
its keyword-only parameters are the source's ``options``. It raises :class:`~impruver.data.messages.RecordError`
for a record it cannot use and :class:`~impruver.data.messages.SkipRecord` for one it leaves out on purpose;
the pipeline adds the file and line, and raises or counts them (``dataset.on_error``). See
:mod:`impruver.data.messages` for the canonical form.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from impruver.data.messages import (
    Conversation,
    Message,
    RecordError,
    SkipRecord,
    function_call_content,
    parse_tools,
    text_of,
)
from impruver import toolcalls
from impruver.registry import formats


def _field(record: dict[str, Any], name: str) -> Any:
    if name not in record or record[name] is None:
        fields = ", ".join(sorted(map(str, record))) or "none"
        raise RecordError("missing_field", f"no field '{name}' (the record has: {fields}); rename yours with "
                                           f"the source's `mapping`, e.g. mapping: {{YOUR_FIELD: {name}}}")
    return record[name]


def _optional_text(record: dict[str, Any], name: str) -> str:
    value = record.get(name)
    if value is None:
        return ""
    return text_of(value, f"field '{name}'")


@formats("instruct")
def instruct(
    record: dict[str, Any],
    *,
    instruction_field: str = "instruction",
    input_field: str = "input",
    output_field: str = "output",
    system_field: str = "system",
    label_field: str = "label",
    skip_labels: Sequence[str] = ("bad_output",),
    input_separator: str = "\n\n",
) -> list[Conversation]:
    """Instruction / input / output records (alpaca and its Russian descendants).

    The user turn is the instruction, followed by the input when there is one. ``answer`` is accepted when
    ``output`` is absent. A ``history`` list of ``[question, answer]`` pairs (LIMA) becomes earlier turns, and an
    ``instances`` list of ``{input, output}`` (the alpaca seed tasks) gives one conversation per instance. Rows
    whose ``label`` is one of ``skip_labels`` are skipped and counted (ru_turbo_alpaca marks bad answers so).

    Examples:
        >>> instruct({"instruction": "2+2?", "input": "", "output": "4"})[0]["messages"][1]
        {'role': 'assistant', 'content': '4'}
    """
    if skip_labels and record.get(label_field) in set(skip_labels):
        raise SkipRecord(str(record[label_field]))
    instruction = text_of(_field(record, instruction_field), f"field '{instruction_field}'")
    system = _optional_text(record, system_field)
    if "instances" in record and output_field not in record:
        pairs = [(i.get(input_field) or "", i.get(output_field)) for i in record["instances"] or []]
    else:
        answer_field = output_field if output_field in record or "answer" not in record else "answer"
        pairs = [(_optional_text(record, input_field), _field(record, answer_field))]
    history: list[Message] = [{"role": "system", "content": system}] if system else []
    for turn in record.get("history") or []:
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise RecordError("bad_history", "history must be a list of [question, answer] pairs")
        history += [{"role": "user", "content": text_of(turn[0], "history")},
                    {"role": "assistant", "content": text_of(turn[1], "history")}]
    conversations = []
    for given, output in pairs:
        prompt = instruction + (input_separator + given if given else "")
        messages = [*history, {"role": "user", "content": prompt},
                    {"role": "assistant", "content": text_of(output, f"field '{output_field}'")}]
        conversations.append({"messages": messages})
    if not conversations:
        raise RecordError("empty_conversation", "an instances list with nothing in it")
    return conversations


SAIGA_ROLES = {"system": "system", "user": "user", "bot": "assistant", "assistant": "assistant",
               "function_call": "function_call", "function_response": "function_response"}


@formats("saiga")
def saiga(record: dict[str, Any], *, field: str = "messages") -> list[Conversation]:
    """Saiga records (ru_turbo_saiga, ru_sharegpt_cleaned, oasst1_ru_main_branch): ``messages`` of ``{role,
    content}``, either a list of dicts (as on disk) or a struct of lists (as ``datasets`` loads it).

    Roles are system, user and bot (the assistant); only ``bot`` / ``assistant`` turns are trained on.

    Examples:
        >>> saiga({"messages": {"role": ["user", "bot"], "content": ["hi", "hello"]}})[0]["messages"][1]["role"]
        'assistant'
    """
    raw = _field(record, field)
    if isinstance(raw, dict):  # struct of lists, as datasets loads it
        roles, contents = raw.get("role") or [], raw.get("content") or []
        if len(roles) != len(contents):
            raise RecordError("bad_messages", f"'{field}' has {len(roles)} roles but {len(contents)} contents")
        raw = [{"role": r, "content": c} for r, c in zip(roles, contents)]
    if isinstance(raw, str):
        raw = _json_list(raw, field)
    messages = []
    for i, message in enumerate(raw):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in SAIGA_ROLES:
            raise RecordError("unknown_role", f"message {i} has role {role!r}; saiga records use "
                                              f"{', '.join(SAIGA_ROLES)}")
        messages.append({"role": SAIGA_ROLES[role], "content": text_of(message.get("content"), f"message {i}")})
    return [{"messages": messages}]


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "chatgpt": "assistant", "system": "system", "function_call": "function_call",
                  "observation": "function_response", "function_response": "function_response", "tool": "function_response"}


@formats("sharegpt")
def sharegpt(record: dict[str, Any], *, field: str = "conversations", tools_field: str = "tools",
             system_field: str = "system") -> list[Conversation]:
    """ShareGPT records: ``conversations`` of ``{from, value}`` (human, gpt, system, function_call, observation)
    and an optional ``tools`` column (a JSON string or a list of function schemas).

    Examples:
        >>> sharegpt({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hey"}]})[0]
        {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hey'}], 'tools': None}
    """
    raw = _field(record, field)
    if isinstance(raw, str):
        raw = _json_list(raw, field)
    messages: list[Message] = []
    system = _optional_text(record, system_field)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(raw):
        who = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        if who not in SHAREGPT_ROLES:
            raise RecordError("unknown_role", f"turn {i} is from {who!r}; sharegpt records use "
                                              f"{', '.join(SHAREGPT_ROLES)}")
        role = SHAREGPT_ROLES[who]
        content = text_of(turn.get("value", turn.get("content")), f"turn {i}")
        messages.append({"role": role, "content": _normal_call(content) if role == "function_call" else content})
    return [{"messages": messages, "tools": parse_tools(record.get(tools_field), "tools")}]


@formats("openai")
def openai(record: dict[str, Any], *, field: str = "messages", tools_field: str = "tools") -> list[Conversation]:
    """OpenAI chat records: ``messages`` (a list, or a JSON string holding one) of ``{role, content}``.

    ``content`` is a string or a list of parts (``text``; LLaMA-Factory's ``reasoning`` and ``tool_call`` parts
    too). An assistant's ``tool_calls`` become function_call turns and the ``tool`` role a function_response;
    impruver's own ``function_call`` / ``function_response`` roles are accepted as they are (glaive-fc-ru).
    The ``tools`` column (list or JSON string) holds the function schemas.

    Examples:
        >>> openai({"messages": '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]'})[0]
        {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}], 'tools': None}
    """
    raw = _field(record, field)
    if isinstance(raw, str):
        raw = _json_list(raw, field)
    if isinstance(raw, dict) and "role" in raw:  # struct of lists
        raw = [{"role": r, "content": c} for r, c in zip(raw["role"], raw.get("content") or [])]
    messages: list[Message] = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise RecordError("bad_messages", f"message {i} is {type(message).__name__}, not an object")
        messages += _openai_message(message, i)
    return [{"messages": messages, "tools": parse_tools(record.get(tools_field), "tools")}]


OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "function_response", "function": "function_response",
                "function_call": "function_call", "function_response": "function_response"}


def _openai_message(message: dict[str, Any], i: int) -> list[Message]:
    """One OpenAI message as one or more canonical messages (an assistant's text, then its tool calls)."""
    role = message.get("role")
    if role not in OPENAI_ROLES:
        raise RecordError("unknown_role", f"message {i} has role {role!r}; openai records use "
                                          f"{', '.join(OPENAI_ROLES)}")
    role = OPENAI_ROLES[role]
    content, reasoning, calls = message.get("content"), message.get("reasoning_content"), []
    if isinstance(content, list):  # parts: text, and LLaMA-Factory's reasoning / tool_call parts
        texts = []
        for part in content:
            kind = part.get("type", "text") if isinstance(part, dict) else "text"
            if kind == "reasoning":
                reasoning = text_of(part.get("value", part.get("text")), f"message {i}")
            elif kind == "tool_call":
                calls.append(function_call_content(part.get("value", part.get("text")), f"message {i}"))
            else:
                texts.append(part)
        content = text_of(texts, f"message {i}") if texts else ""
    elif content is None:
        content = ""
    else:
        content = text_of(content, f"message {i}")
    for call in message.get("tool_calls") or []:
        calls.append(function_call_content(call if isinstance(call, dict) else {}, f"message {i}"))
    if isinstance(message.get("function_call"), dict):  # the older OpenAI API
        calls.append(function_call_content(message["function_call"], f"message {i}"))
    if role == "function_call":
        return [{"role": "function_call", "content": _normal_call(content)}]
    out: list[Message] = []
    if content or not calls:
        out.append({"role": role, "content": content})
    out += [{"role": "function_call", "content": c} for c in calls]
    if reasoning:
        out[0]["reasoning"] = reasoning
    return out


def _normal_call(content: str) -> str:
    """A function_call turn's text as canonical JSON when it is a JSON call; otherwise as written."""
    try:
        return toolcalls.normal_content(content)
    except toolcalls.ToolCallError as exc:
        raise RecordError("bad_function_call", f"function_call: {exc}") from None


def _json_list(text: str, field: str) -> list[Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise RecordError("bad_messages", f"'{field}' is a string but not valid JSON") from None
    if not isinstance(value, list):
        raise RecordError("bad_messages", f"'{field}' holds {type(value).__name__}, not a list of messages")
    return value


ROLEPLAY_ROLES = {"user": "user", "operator": "user", "char": "assistant", "bot": "assistant",
                  "assistant": "assistant"}


@formats("roleplay")
def roleplay(record: dict[str, Any], *, greeting: bool = True) -> list[Conversation]:
    """gpt_roleplay_realm characters: ``name, context, greeting, example_dialogue, dialogues``.

    Each of the record's ``dialogues`` (``{chat: [{role: operator|char, content}]}``) becomes one conversation
    whose system prompt is the character's context, opening with the character's greeting; a record without
    dialogues (the chargen seeds) gives its ``example_dialogue`` (roles user / char).
    """
    name = text_of(_field(record, "name"), "field 'name'")
    context = text_of(_field(record, "context"), "field 'context'")
    system = f"{name}. {context}" if not context.startswith(name) else context
    chats = [d.get("chat") if isinstance(d, dict) else d for d in record.get("dialogues") or []]
    if not chats:
        chats = [_field(record, "example_dialogue")]
    opening = _optional_text(record, "greeting") if greeting else ""
    conversations = []
    for chat in chats:
        messages: list[Message] = [{"role": "system", "content": system}]
        if opening and not (chat and chat[0].get("role") in ("char", "bot") and chat[0].get("content") == opening):
            messages.append({"role": "assistant", "content": opening})
        for i, turn in enumerate(chat or []):
            if turn.get("role") not in ROLEPLAY_ROLES:
                raise RecordError("unknown_role", f"dialogue turn {i} has role {turn.get('role')!r}; "
                                                  f"roleplay records use {', '.join(ROLEPLAY_ROLES)}")
            messages.append({"role": ROLEPLAY_ROLES[turn["role"]], "content": text_of(turn.get("content"),
                                                                                      f"turn {i}")})
        conversations.append({"messages": messages})
    return conversations


@formats("text")
def text(record: dict[str, Any], *, field: str = "text") -> list[Conversation]:
    """Raw text for pretraining: every token is trained on; long texts are cut into context-sized samples.

    Examples:
        >>> text({"text": "Once upon a time"})
        [{'text': 'Once upon a time'}]
    """
    return [{"text": text_of(_field(record, field), f"field '{field}'")}]


@formats("reasoning")
def reasoning(
    record: dict[str, Any],
    *,
    prompt_field: str = "prompt",
    reasoning_field: str = "reasoning",
    answer_field: str = "answer",
    system_field: str = "system",
) -> list[Conversation]:
    """Prompt / reasoning / answer records: one assistant turn whose reasoning the template marks up (as
    ``reasoning_content`` for templates that take it, else ``<think>...</think>`` before the answer).

    Examples:
        >>> reasoning({"prompt": "2+2?", "reasoning": "two and two", "answer": "4"})[0]["messages"][1]
        {'role': 'assistant', 'content': '4', 'reasoning': 'two and two'}
    """
    messages: list[Message] = []
    system = _optional_text(record, system_field)
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": text_of(_field(record, prompt_field), f"field '{prompt_field}'")})
    answer = {"role": "assistant", "content": text_of(_field(record, answer_field), f"field '{answer_field}'")}
    thought = _optional_text(record, reasoning_field)
    if thought:
        answer["reasoning"] = thought
    return [{"messages": [*messages, answer]}]
