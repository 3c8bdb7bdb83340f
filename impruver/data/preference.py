"""Preference record formats: the shapes users have, turned into impruver's canonical pair and labelled records.

A *pair* (dpo, ipo, orpo, simpo) and a *labelled answer* (kto) are plain dicts of canonical messages
(:mod:`impruver.data.messages`)::

    {"prompt": [messages...], "chosen": [messages...], "rejected": [messages...], "tools": [...] | None}
    {"prompt": [messages...], "completion": [messages...], "label": True | False, "tools": [...] | None}

The prompt is everything before the answers (system, earlier turns, the last user turn); each answer is one or
more assistant / function_call messages, the only trained spans. Formats register in the ``formats`` registry
like the SFT formats, and say what they produce through the ``produces`` attribute (``"pair"`` or
``"labelled"``; SFT formats, which have none, produce conversations), so compose can ask a format instead of
matching its name. Each raises :class:`~impruver.data.messages.RecordError` for a record it cannot use and
:class:`~impruver.data.messages.SkipRecord` (``identical_answers``) for a pair that teaches nothing.

Formats:

* ``trl_preference``: TRL's ``prompt`` / ``chosen`` / ``rejected``, as text or message lists, or without
  ``prompt`` (TRL's "implicit prompt": two whole conversations sharing their beginning);
* ``trl_kto``: TRL's unpaired ``prompt`` / ``completion`` / ``label``;
* ``alpaca_preference``: LLaMA-Factory's alpaca ranking records (``instruction``, ``input``, ``chosen``,
  ``rejected``, optional ``system`` and ``history``);
* ``sharegpt_preference``: LLaMA-Factory's sharegpt ranking records (``conversations`` ending with the user's
  turn, ``chosen`` / ``rejected`` the two answers as ``{from, value}``);
* ``openai_preference``: OpenAI-style message lists with two final answers: ``chosen_messages`` /
  ``rejected_messages`` (LLaMA-Factory v1), i.e. two conversations that differ only in their final answer; or a
  ``messages`` prompt with ``chosen`` / ``rejected`` answers beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from impruver.data.formats import instruct, openai, sharegpt
from impruver.data.messages import (
    TRAINABLE_ROLES,
    Message,
    RecordError,
    SkipRecord,
    parse_tools,
    text_of,
    validate,
)
from impruver.registry import formats

PAIR = "pair"  # {"prompt", "chosen", "rejected", "tools"}
LABELLED = "labelled"  # {"prompt", "completion", "label", "tools"}
PairRecord = dict[str, Any]


def _preference_format(name: str, produces: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a format and record what it produces (read by compose through ``produces_of``)."""

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        func.produces = produces  # type: ignore[attr-defined]
        return formats(name)(func)

    return wrap


def produces_of(format_func: Callable[..., Any]) -> str:
    """What a registered format produces: ``pair``, ``labelled`` or ``conversation`` (SFT formats)."""
    return getattr(format_func, "produces", "conversation")


# ---- checks shared by every format ----

def check_pair(pair: PairRecord, where: str = "record") -> PairRecord:
    """Check a pair record; return it unchanged.

    Raises:
        RecordError: an empty prompt or answer, an answer with a non-trainable role, or any message problem
            :func:`~impruver.data.messages.validate` finds.
        SkipRecord: ``identical_answers`` (a pair whose two answers are the same teaches nothing).
    """
    _check_prompt(pair["prompt"], where)
    for side in ("chosen", "rejected"):
        _check_answer(pair["prompt"], pair[side], f"{where} ({side})")
    if _words(pair["chosen"]) == _words(pair["rejected"]):
        raise SkipRecord("identical_answers")
    return pair


def check_labelled(record: PairRecord, where: str = "record") -> PairRecord:
    """Check a labelled (KTO) record; return it unchanged."""
    _check_prompt(record["prompt"], where)
    _check_answer(record["prompt"], record["completion"], where)
    if not isinstance(record["label"], bool):
        raise RecordError("bad_label", f"{where}: label must be true or false, not {record['label']!r}")
    return record


def _check_prompt(prompt: list[Message], where: str) -> None:
    if not prompt or all(m["role"] == "system" for m in prompt):
        raise RecordError("empty_prompt", f"{where}: the prompt has no user turn")
    if prompt[-1]["role"] in TRAINABLE_ROLES:
        raise RecordError("prompt_ends_with_answer", f"{where}: the prompt ends with an {prompt[-1]['role']} "
                                                     "turn; it must end with the turn the answers reply to")


def _check_answer(prompt: list[Message], answer: list[Message], where: str) -> None:
    if not answer:
        raise RecordError("empty_answer", f"{where}: no answer")
    for m in answer:
        if m["role"] not in TRAINABLE_ROLES:
            raise RecordError("bad_answer", f"{where}: an answer holds a {m['role']} turn; answers are assistant "
                                            "or function_call turns only")
    validate({"messages": [*prompt, *answer]}, where)


def _words(messages: list[Message]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"].strip()) for m in messages]


def _pair(prompt: list[Message], chosen: list[Message], rejected: list[Message], tools: Any) -> list[PairRecord]:
    return [check_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": tools})]


def _field(record: dict[str, Any], name: str) -> Any:
    if record.get(name) is None:
        fields = ", ".join(sorted(map(str, record))) or "none"
        raise RecordError("missing_field", f"no field '{name}' (the record has: {fields}); rename yours with "
                                           f"the source's `mapping`, e.g. mapping: {{YOUR_FIELD: {name}}}")
    return record[name]


def _system(record: dict[str, Any], field: str) -> list[Message]:
    value = record.get(field)
    text = text_of(value, f"field '{field}'") if value is not None else ""
    return [{"role": "system", "content": text}] if text else []


def _messages(value: Any, where: str) -> tuple[list[Message], Any]:
    """OpenAI-style messages (a list, or a JSON string of one) as canonical messages, and the tools; a problem
    names the field (``where``)."""
    try:
        converted = openai({"messages": value})[0]
    except RecordError as exc:
        raise RecordError(exc.reason, f"{where}: {exc.detail}") from None
    return converted["messages"], converted["tools"]


def _answer(value: Any, where: str) -> list[Message]:
    """An answer given as text, as one message or as a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and all(isinstance(m, dict) and "from" in m for m in value):
        return sharegpt({"conversations": value})[0]["messages"]
    return _messages(value, where)[0]


def split_shared_prompt(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], list[Message],
                                                                                  list[Message]]:
    """(prompt, chosen answer, rejected answer) of two whole conversations: the prompt is their longest common
    beginning that ends before an assistant turn of each (TRL's implicit prompt, LLaMA-Factory v1's pairs)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # the answers start at the first trainable turn after the last non-trainable turn of the shared part
    while shared > 0 and chosen[shared - 1]["role"] in TRAINABLE_ROLES:
        shared -= 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


# ---- the formats ----

@_preference_format("trl_preference", PAIR)
def trl_preference(record: dict[str, Any], *, prompt_field: str = "prompt", chosen_field: str = "chosen",
                   rejected_field: str = "rejected", system_field: str = "system",
                   tools_field: str = "tools") -> list[PairRecord]:
    """TRL preference records: ``prompt`` / ``chosen`` / ``rejected`` as text or as message lists.

    Without a ``prompt``, ``chosen`` and ``rejected`` are two whole conversations and the prompt is their shared
    beginning (TRL's implicit prompt). A text prompt is one user turn, a text answer one assistant turn.

    Examples:
        >>> trl_preference({"prompt": "2+2?", "chosen": "4", "rejected": "5"})[0]["chosen"]
        [{'role': 'assistant', 'content': '4'}]
    """
    tools = record.get(tools_field)
    system = _system(record, system_field)
    if record.get(prompt_field) is None:
        chosen, tools_c = _messages(_field(record, chosen_field), f"field '{chosen_field}'")
        rejected, _ = _messages(_field(record, rejected_field), f"field '{rejected_field}'")
        prompt, chosen, rejected = split_shared_prompt(chosen, rejected)
        return _pair(_with_system(system, prompt), chosen, rejected, tools_c)
    raw_prompt = record[prompt_field]
    if isinstance(raw_prompt, str):
        prompt, parsed_tools = [{"role": "user", "content": raw_prompt}], None
    else:
        prompt, parsed_tools = _messages(raw_prompt, f"field '{prompt_field}'")
    if tools is not None:
        parsed_tools = parse_tools(tools, "tools")
    chosen = _answer(_field(record, chosen_field), f"field '{chosen_field}'")
    rejected = _answer(_field(record, rejected_field), f"field '{rejected_field}'")
    return _pair(_with_system(system, prompt), chosen, rejected, parsed_tools)


@_preference_format("trl_kto", LABELLED)
def trl_kto(record: dict[str, Any], *, prompt_field: str = "prompt", completion_field: str = "completion",
            label_field: str = "label", system_field: str = "system") -> list[PairRecord]:
    """TRL's unpaired preference records for KTO: ``prompt`` / ``completion`` (text or messages) and a boolean
    ``label`` (true: a desirable answer).

    Examples:
        >>> trl_kto({"prompt": "2+2?", "completion": "4", "label": True})[0]["label"]
        True
    """
    raw_prompt = _field(record, prompt_field)
    if isinstance(raw_prompt, str):
        prompt, tools = [{"role": "user", "content": raw_prompt}], None
    else:
        prompt, tools = _messages(raw_prompt, f"field '{prompt_field}'")
    label = _field(record, label_field)
    if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        label = bool(label)
    completion = _answer(_field(record, completion_field), f"field '{completion_field}'")
    labelled = {"prompt": _with_system(_system(record, system_field), prompt), "completion": completion,
                "label": label, "tools": tools}
    return [check_labelled(labelled)]


@_preference_format("alpaca_preference", PAIR)
def alpaca_preference(record: dict[str, Any], *, instruction_field: str = "instruction",
                      input_field: str = "input", chosen_field: str = "chosen", rejected_field: str = "rejected",
                      system_field: str = "system") -> list[PairRecord]:
    """LLaMA-Factory alpaca ranking records: ``instruction`` (+ ``input``) is the user turn, ``chosen`` and
    ``rejected`` the two answers (text); ``system`` and a ``history`` of [question, answer] pairs are optional.

    Examples:
        >>> alpaca_preference({"instruction": "2+2?", "chosen": "4", "rejected": "5"})[0]["prompt"]
        [{'role': 'user', 'content': '2+2?'}]
    """
    chosen_text = text_of(_field(record, chosen_field), f"field '{chosen_field}'")
    rejected_text = text_of(_field(record, rejected_field), f"field '{rejected_field}'")
    conversation = instruct({**record, "__answer": chosen_text}, instruction_field=instruction_field,
                            input_field=input_field, output_field="__answer", system_field=system_field,
                            skip_labels=())[0]
    prompt = conversation["messages"][:-1]
    return _pair(prompt, [{"role": "assistant", "content": chosen_text}],
                 [{"role": "assistant", "content": rejected_text}], None)


@_preference_format("sharegpt_preference", PAIR)
def sharegpt_preference(record: dict[str, Any], *, field: str = "conversations", chosen_field: str = "chosen",
                        rejected_field: str = "rejected", system_field: str = "system",
                        tools_field: str = "tools") -> list[PairRecord]:
    """LLaMA-Factory sharegpt ranking records: ``conversations`` ({from, value} turns, ending with the user's)
    and the two answers ``chosen`` / ``rejected`` ({from: gpt, value}, or text).

    Examples:
        >>> r = {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "hello"},
        ...      "rejected": {"from": "gpt", "value": "go away"}}
        >>> sharegpt_preference(r)[0]["rejected"]
        [{'role': 'assistant', 'content': 'go away'}]
    """
    conversation = sharegpt(record, field=field, tools_field=tools_field, system_field=system_field)[0]
    chosen = _answer(_field(record, chosen_field), f"field '{chosen_field}'")
    rejected = _answer(_field(record, rejected_field), f"field '{rejected_field}'")
    return _pair(conversation["messages"], chosen, rejected, conversation["tools"])


@_preference_format("openai_preference", PAIR)
def openai_preference(record: dict[str, Any], *, chosen_field: str = "chosen_messages",
                      rejected_field: str = "rejected_messages", messages_field: str = "messages",
                      answer_fields: tuple[str, str] = ("chosen", "rejected"),
                      tools_field: str = "tools") -> list[PairRecord]:
    """OpenAI-style message lists with two final answers.

    Either two whole conversations that differ only in the final answer (``chosen_messages`` /
    ``rejected_messages``, LLaMA-Factory v1; content may be a list of text parts), or a ``messages`` prompt with
    the answers beside it (``chosen`` / ``rejected``: text, a message or a list of messages).

    Examples:
        >>> user = {"role": "user", "content": "2+2?"}
        >>> r = {"chosen_messages": [user, {"role": "assistant", "content": "4"}],
        ...      "rejected_messages": [user, {"role": "assistant", "content": "5"}]}
        >>> openai_preference(r)[0]["prompt"]
        [{'role': 'user', 'content': '2+2?'}]
    """
    tools = parse_tools(record.get(tools_field), "tools")
    if record.get(chosen_field) is not None or record.get(messages_field) is None:
        chosen, _ = _messages(_field(record, chosen_field), f"field '{chosen_field}'")
        rejected, _ = _messages(_field(record, rejected_field), f"field '{rejected_field}'")
        prompt, chosen, rejected = split_shared_prompt(chosen, rejected)
        return _pair(prompt, chosen, rejected, tools)
    prompt, _ = _messages(record[messages_field], f"field '{messages_field}'")
    chosen = _answer(_field(record, answer_fields[0]), f"field '{answer_fields[0]}'")
    rejected = _answer(_field(record, answer_fields[1]), f"field '{answer_fields[1]}'")
    return _pair(prompt, chosen, rejected, tools)


def _with_system(system: list[Message], prompt: list[Message]) -> list[Message]:
    if system and not (prompt and prompt[0]["role"] == "system"):
        return [*system, *prompt]
    return prompt


# ---- tokenizing: the same Renderer, masks and length policy as SFT, applied to the pair as a whole ----

def encode_pair(encoder: Any, pair: PairRecord, options: Any) -> dict[str, Any] | RecordError:
    """A pair as training samples: ``{"chosen": {input_ids, labels}, "rejected": {...}, "prompt_tokens": n}``.

    Both conversations (prompt + answer) go through the SFT :class:`~impruver.data.render.Encoder` (same template,
    masks and special tokens), so only the answers are trained. Lengths are limited per pair: when either side is
    longer than ``options.max_tokens``, the pair is dropped (``length_policy: drop``) or the prompt's first
    exchange is removed from *both* sides until it fits (``truncate``). The two sides must start with the same
    prompt tokens (everything before the first trained token); a tokenizer that merges the prompt's end with the
    answers' beginnings differently fails the record with ``prompt_tokens_differ``.
    """
    from dataclasses import replace

    prompt = pair["prompt"]
    while True:
        sides = [{"messages": [*prompt, *pair[side]], "tools": pair.get("tools")} for side in ("chosen", "rejected")]
        results = encoder.encode(sides, replace(options, length_policy="drop"))
        too_long = [r for r in results if isinstance(r, RecordError) and r.reason == "too_long"]
        if not too_long or options.length_policy != "truncate":
            break
        prompt = _without_first_exchange(prompt)
        if prompt is None:
            return RecordError("too_long", f"{too_long[0].detail} even with only the last exchange")
    for result in results:
        if isinstance(result, RecordError):
            return result
    chosen, rejected = results[0][0], results[1][0]
    n = _prompt_length(chosen.labels)
    if n != _prompt_length(rejected.labels) or chosen.input_ids[:n] != rejected.input_ids[:n]:
        return RecordError("prompt_tokens_differ", "the chosen and rejected samples do not start with the same "
                                                   "prompt tokens (the tokenizer merges across the prompt's end)")
    return {"chosen": {"input_ids": chosen.input_ids, "labels": chosen.labels},
            "rejected": {"input_ids": rejected.input_ids, "labels": rejected.labels}, "prompt_tokens": n}


def encode_labelled(encoder: Any, record: PairRecord, options: Any) -> dict[str, Any] | RecordError:
    """A labelled (KTO) record as ``{"completion": {input_ids, labels}, "label": bool}`` (the SFT encoding)."""
    conversation = {"messages": [*record["prompt"], *record["completion"]], "tools": record.get("tools")}
    result = encoder.encode([conversation], options)[0]
    if isinstance(result, RecordError):
        return result
    sample = result[0]
    return {"completion": {"input_ids": sample.input_ids, "labels": sample.labels}, "label": record["label"]}


def _prompt_length(labels: list[int]) -> int:
    from impruver.record import IGNORE_INDEX

    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def _without_first_exchange(prompt: list[Message]) -> list[Message] | None:
    """The prompt without its first non-system exchange (up to the next user turn); None if only one is left."""
    first = 1 if prompt and prompt[0]["role"] == "system" else 0
    users = [i for i in range(first + 1, len(prompt)) if prompt[i]["role"] == "user"]
    return [*prompt[:first], *prompt[users[0]:]] if users else None


def unpair(pair: PairRecord) -> list[PairRecord]:
    """A pair as two labelled records (KTO on paired data, as TRL's ``unpair_preference_dataset``)."""
    return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True, "tools": pair.get("tools")},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False, "tools": pair.get("tools")}]


__all__ = ["LABELLED", "PAIR", "alpaca_preference", "check_labelled", "check_pair", "encode_labelled",
           "encode_pair", "openai_preference", "produces_of", "sharegpt_preference", "split_shared_prompt",
           "trl_kto", "trl_preference", "unpair"]
