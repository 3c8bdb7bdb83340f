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
    history_field: str = "history",
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
    for turn in record.get(history_field) or []:
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
             system_field: str = "system", role_tag: str | None = None, content_tag: str | None = None,
             user_tag: str | None = None, assistant_tag: str | None = None, observation_tag: str | None = None,
             function_tag: str | None = None, system_tag: str | None = None,
             weight_field: str = "weight") -> list[Conversation]:
    """ShareGPT records: ``conversations`` of ``{from, value}`` (human, gpt, system, function_call, observation)
    and an optional ``tools`` column (a JSON string or a list of function schemas).

    The ``*_tag`` options are LLaMA-Factory's ``tags`` (the keys holding a turn's role and text, and the names of
    its roles) for records that name them otherwise. A turn's ``weight`` (or ``loss_weight``) of 0 keeps it out
    of the loss.

    Examples:
        >>> sharegpt({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hey"}]})[0]
        {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hey'}], 'tools': None}
    """
    raw = _field(record, field)
    if isinstance(raw, str):
        raw = _json_list(raw, field)
    roles = dict(SHAREGPT_ROLES)
    for tag, role in ((user_tag, "user"), (assistant_tag, "assistant"), (observation_tag, "function_response"),
                      (function_tag, "function_call"), (system_tag, "system")):
        if tag:
            roles[tag] = role
    messages: list[Message] = []
    system = _optional_text(record, system_field)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(raw):
        who = (turn.get(role_tag) if role_tag else turn.get("from", turn.get("role"))) \
            if isinstance(turn, dict) else None
        if who not in roles:
            raise RecordError("unknown_role", f"turn {i} is from {who!r}; sharegpt records use "
                                              f"{', '.join(roles)}")
        role = roles[who]
        value = turn.get(content_tag) if content_tag else turn.get("value", turn.get("content"))
        content = text_of(value, f"turn {i}")
        message = {"role": role, "content": _normal_call(content) if role == "function_call" else content}
        messages.append(_weighted(message, turn, weight_field, i))
    return [{"messages": messages, "tools": parse_tools(record.get(tools_field), "tools")}]


def _weighted(message: Message, raw: dict[str, Any], weight_field: str, i: int) -> Message:
    """``message`` kept out of the loss when its raw turn says ``weight: 0`` (OpenAI fine-tuning, axolotl) or
    ``loss_weight: 0``. A mask trains a token or not: weights other than 0 and 1 are refused."""
    weight = raw.get(weight_field, raw.get("loss_weight"))
    if weight is None:
        return message
    if isinstance(weight, bool) or weight not in (0, 1):
        raise RecordError("bad_weight", f"turn {i} has weight {weight!r}; impruver trains a turn (1) or not (0)")
    return message if weight else {**message, "train": False}


@formats("openai")
def openai(record: dict[str, Any], *, field: str = "messages", tools_field: str = "tools",
           weight_field: str = "weight") -> list[Conversation]:
    """OpenAI chat records: ``messages`` (a list, or a JSON string holding one) of ``{role, content}``.

    ``content`` is a string or a list of parts (``text``; LLaMA-Factory's ``reasoning`` and ``tool_call`` parts
    too). An assistant's ``tool_calls`` become function_call turns and the ``tool`` role a function_response;
    impruver's own ``function_call`` / ``function_response`` roles are accepted as they are (glaive-fc-ru).
    The ``tools`` column (list or JSON string) holds the function schemas. A message's ``weight`` (or
    ``loss_weight``) of 0 keeps it out of the loss (OpenAI fine-tuning files).

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
        messages += [_weighted(m, message, weight_field, i) for m in _openai_message(message, i)]
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
    out: list[Message] = []
    if role == "function_call":  # impruver's own role (as its flat export writes it), reasoning kept
        calls, content = [_normal_call(content)], ""
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


OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


@formats("oasst")
def oasst(record: dict[str, Any], *, branch: str = "main", max_rank: int | None = None,
          langs: Sequence[str] = (), include_deleted: bool = False) -> list[Conversation]:
    """OpenAssistant message trees, as the oasst trees export writes them: ``{"message_tree_id", "prompt":
    {text, role: prompter|assistant, rank, lang, deleted, review_result, replies: [...]}}`` (a bare root message
    with ``replies`` works too).

    OpenAssistant's flat message export (one message a record, with parent ids) is read too: the source
    assembles its trees first (:func:`oasst_trees`).

    ``branch: main`` gives one conversation per tree, following the best-ranked reply (rank 0) at every turn;
    ``branch: all`` gives one per leaf, every path from the prompt to an answer. Replies ranked worse than
    ``max_rank``, deleted ones, those that failed review and (with ``langs``) other languages are left out. A
    path ends with the last assistant message on it.

    Examples:
        >>> tree = {"prompt": {"role": "prompter", "text": "hi", "replies": [
        ...     {"role": "assistant", "text": "bad", "rank": 1, "replies": []},
        ...     {"role": "assistant", "text": "good", "rank": 0, "replies": []}]}}
        >>> [m["content"] for m in oasst(tree)[0]["messages"]]
        ['hi', 'good']
        >>> len(oasst(tree, branch="all"))
        2
    """
    if branch not in ("main", "all"):
        raise RecordError("bad_option", f"branch must be main or all, not {branch!r}")
    root = record.get("prompt") if isinstance(record.get("prompt"), dict) else record
    if "replies" not in root or "text" not in root:
        raise RecordError("missing_field", "an oasst tree has a 'prompt' message (text, role, replies)")

    def usable(message: dict[str, Any]) -> bool:
        rank = message.get("rank")
        return ((include_deleted or not message.get("deleted")) and message.get("review_result") is not False
                and (max_rank is None or rank is None or rank <= max_rank)
                and (not langs or message.get("lang") in langs))

    def ranked(message: dict[str, Any]) -> list[dict[str, Any]]:  # best first; unranked after ranked, in order
        replies = [r for r in message.get("replies") or [] if isinstance(r, dict) and usable(r)]
        return sorted(replies, key=lambda r: (r.get("rank") is None, r.get("rank") or 0))

    if not usable(root):
        raise SkipRecord("oasst_filtered")
    paths: list[list[dict[str, Any]]] = []
    stack = [[root]]
    while stack:  # depth first, best replies first: paths come out in rank order
        path = stack.pop()
        replies = ranked(path[-1])
        if not replies:
            paths.append(path)
        elif branch == "main":
            stack.append([*path, replies[0]])
        else:
            stack.extend([*path, reply] for reply in reversed(replies))
    conversations = []
    for path in paths:
        while path and path[-1].get("role") != "assistant":
            path = path[:-1]
        if path:
            conversations.append({"messages": [_oasst_message(m, i) for i, m in enumerate(path)]})
    if not conversations:
        raise SkipRecord("oasst_unanswered")
    return conversations


_OASST_ID = ("message_id", "user_message_id")  # a message's id in OpenAssistant's exports
_OASST_PARENT = ("parent_id", "parent_message_id")  # and its parent's (null for a prompt)


def oasst_trees(items: Any) -> Any:
    """OpenAssistant's flat message export (one message a record, linked by ``parent_id`` / ``parent_message_id``
    to its parent's ``message_id`` / ``user_message_id``) assembled into the trees :func:`oasst` reads, one per
    prompt, in the order the prompts come; replies keep their order. Records that are trees already pass as they
    are. A flat export is held whole while its trees are built (messages can come in any order); a message whose
    parent is not in the file is left out, and counted in the log.

    Args:
        items: ``(where, payload)`` pairs as sources yield them (payloads parsed here).
    """
    from impruver.data.convert import parse_payload

    messages: list[tuple[str, dict[str, Any]]] = []
    for where, payload in items:
        try:
            record = parse_payload(payload)
        except RecordError:
            yield where, payload  # the converter reports it, with its line
            continue
        if not any(key in record for key in _OASST_PARENT):
            yield where, record
            continue
        messages.append((where, record))
    if not messages:
        return
    nodes = {}
    for where, record in messages:
        key = next((record[k] for k in _OASST_ID if record.get(k) is not None), None)
        nodes[key] = {**record, "replies": []}
    roots, orphans = [], 0
    for where, record in messages:
        node = nodes[next((record[k] for k in _OASST_ID if record.get(k) is not None), None)]
        parent = next((record[k] for k in _OASST_PARENT if record.get(k) is not None), None)
        if parent is None:
            roots.append((where, node))
        elif parent in nodes:
            nodes[parent]["replies"].append(node)
        else:
            orphans += 1
    if orphans:
        import logging

        logging.getLogger("impruver").warning("%d OpenAssistant messages whose parent is not in the file were left "
                                              "out", orphans)
    for where, node in roots:
        yield where, {"prompt": node}


def _oasst_message(message: dict[str, Any], i: int) -> Message:
    role = message.get("role")
    if role not in OASST_ROLES:
        raise RecordError("unknown_role", f"message {i} has role {role!r}; oasst trees use prompter, assistant")
    return {"role": OASST_ROLES[role], "content": text_of(message.get("text"), f"message {i}")}


oasst.assemble = oasst_trees  # a source step: a flat message export becomes trees before records are counted


@formats("prompt_completion")
def prompt_completion(record: dict[str, Any], *, prompt_field: str = "prompt", completion_field: str = "completion",
                      system_field: str = "system") -> list[Conversation]:
    """TRL's prompt / completion records, standard or conversational.

    Standard records (``prompt`` and ``completion`` are text) become one user turn and one assistant turn of the
    chat template; conversational ones (lists of ``{role, content}`` messages, as OpenAI's) are the prompt's
    messages followed by the completion's, and only the completion is trained (TRL's completion-only loss).

    Examples:
        >>> prompt_completion({"prompt": "2+2?", "completion": "4"})[0]["messages"]
        [{'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4'}]
        >>> prompt_completion({"prompt": [{"role": "user", "content": "hi"}],
        ...                    "completion": [{"role": "assistant", "content": "hey"}]})[0]["messages"][1]
        {'role': 'assistant', 'content': 'hey'}
    """
    prompt, completion = _field(record, prompt_field), _field(record, completion_field)
    messages: list[Message] = []
    system = _optional_text(record, system_field)
    if system:
        messages.append({"role": "system", "content": system})
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):  # conversational
        messages += [m for i, raw in enumerate(prompt) for m in _openai_message(raw, i)]
        if not isinstance(completion, list):
            completion = [{"role": "assistant", "content": completion}]
        said = [m for i, raw in enumerate(completion) for m in _openai_message(raw, len(prompt) + i)]
        if any(m["role"] not in ("assistant", "function_call") for m in said):
            raise RecordError("bad_completion", "a completion holds only assistant messages")
        messages += said
        messages = [m if m in said else {**m, "train": False} for m in messages]
    else:
        messages += [{"role": "user", "content": text_of(prompt, f"field '{prompt_field}'")},
                     {"role": "assistant", "content": text_of(completion, f"field '{completion_field}'")}]
    return [{"messages": messages}]


# -- format: auto ----------------------------------------------------------------------------------------------

# (format, what the records look like): the first rule every sampled record matches wins.
_DETECTORS: list[tuple[str, str, Any]] = [
    ("oasst", "OpenAssistant trees ('prompt' with 'replies')",
     lambda r: isinstance(r.get("prompt"), dict) and "replies" in r["prompt"] or "message_tree_id" in r),
    ("sharegpt", "'conversations' of {from, value}", lambda r: _turns_with(r.get("conversations"), "from", "role")),
    ("saiga", "'messages' with the role 'bot'", lambda r: _turns_with(r.get("messages"), "role", bot=True)),
    ("openai", "'messages' of {role, content}", lambda r: _turns_with(r.get("messages"), "role")),
    ("prompt_completion", "'prompt' and 'completion'", lambda r: "prompt" in r and "completion" in r),
    ("reasoning", "'prompt', 'reasoning' and 'answer'", lambda r: {"prompt", "answer"} <= r.keys()),
    ("instruct", "'instruction' and 'output' (alpaca)",
     lambda r: "instruction" in r and ({"output", "answer", "instances"} & r.keys())),
    ("roleplay", "'name', 'context' and dialogues (gpt_roleplay_realm)", lambda r: {"name", "context"} <= r.keys()),
    ("text", "'text' only (raw text)", lambda r: isinstance(r.get("text"), str)),
]


def _turns_with(value: Any, key: str, other: str | None = None, *, bot: bool = False) -> bool:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return False
    if isinstance(value, dict) and key in value:  # a struct of lists, as datasets loads it
        roles = value.get(key) or []
        return bool(roles) and (not bot or "bot" in roles)
    if not isinstance(value, list) or not value or not all(isinstance(t, dict) for t in value):
        return False
    if not all(key in t or (other and other in t) for t in value):
        return False
    return not bot or any(t.get(key) == "bot" for t in value)


def detect_format(records: list[dict[str, Any]]) -> tuple[str, str]:
    """The format the records are in, and why (the fields that decided it).

    Raises:
        RecordError: no known format fits all the records.
    """
    records = [r for r in records if isinstance(r, dict)]
    for name, looks, matches in _DETECTORS:
        if records and all(matches(r) for r in records):
            return name, looks
    fields = sorted({str(k) for r in records for k in r})
    raise RecordError("unknown_format", f"no known format fits records with fields {', '.join(fields) or 'none'}; "
                                        "name the source's format (instruct, sharegpt, openai, ...) and, if the "
                                        "fields differ, a mapping")


@formats("auto")
def auto(record: dict[str, Any]) -> list[Conversation]:
    """The format read from the record's fields (composition decides once per source from its first records and
    names its choice; this per-record fallback serves where no record could be read ahead)."""
    from impruver import registry

    name, _ = detect_format([record])
    return registry.lookup("formats", name)(record)
