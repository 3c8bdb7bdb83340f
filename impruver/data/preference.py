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


# ---- compose: the pair path of `impruver compose` (called by the pipeline when the objective is a preference one) --

def record_kind(plan: Any) -> str:
    """What a preference plan's composed lines hold: ``pair`` (dpo, ipo, orpo, simpo) or ``labelled`` (kto; its
    pairs are unpaired into one desirable and one undesirable answer)."""
    from impruver.objectives import objective_of

    return PAIR if objective_of(plan).pairs else LABELLED


def compose_pairs(plan: Any, *, force: bool = False) -> Any:
    """Compose a preference mix: the SFT pipeline's fingerprint, tokenizer, renderer, masks, length limit, exact
    dedup, seeded split, weights and report, applied to pairs (or labelled answers) as wholes.

    Each train / val line is one pair ``{"chosen": {input_ids, labels}, "rejected": {...}, "prompt_tokens": n}``
    (or ``{"completion": {...}, "label": bool}``). Returns the pipeline's :class:`ComposeResult`; the report's
    ``records`` says which kind the lines hold.
    """
    import hashlib
    from pathlib import Path

    from impruver.data import pipeline
    from impruver.errors import DataError

    kind = record_kind(plan)
    paths = pipeline.paths_of(plan)
    digest = hashlib.sha256(f"{pipeline.fingerprint(plan)}:{kind}:{PAIR_DATA_VERSION}".encode()).hexdigest()
    saved = None if force else pipeline._up_to_date(paths, digest)
    if saved is not None:
        pipeline.log.info("dataset up to date (fingerprint %s): reusing %s", digest[:12], paths["data"])
        return pipeline._result(paths, digest, saved, reused=True)
    settings = pipeline._settings(plan, Path())  # formats chosen (format auto reads records) before any folder
    with pipeline.compose_work(paths) as work:
        settings["tokenizer_dir"] = str(work / pipeline.TOKENIZER_DIR)
        tokenizer = _prepare_tokenizer(plan, work / pipeline.TOKENIZER_DIR)
        encoder = _encoder(tokenizer)
        units, counts = [], {}
        for name, spec in plan.sources.items():
            counts[name] = _source_units(plan, name, spec, settings["sources"][name], settings["on_error"], encoder,
                                         kind, units)
        decisions = _decide_units(plan, units)
        stats = _write_units(units, decisions, work)
        report = _pair_report(plan, digest, tokenizer, settings, counts, units, decisions, stats, kind)
        if not report["train"]["samples"]:
            raise DataError("no preference pair is left after composition: " + "; ".join(
                f"{n}: {r['loaded']} loaded, {sum(r['invalid'].values())} invalid, {sum(r['skipped'].values())} "
                f"skipped, {r['too_long']} too long (max_tokens {plan.max_tokens}), {r['duplicates']} duplicates"
                for n, r in report["sources"].items()))
        pipeline._publish(paths, work, report)
    pipeline.log.info("composed %d train / %d val %ss: %s", report["train"]["samples"], report["val"]["samples"],
                      kind, paths["data"])
    return pipeline._result(paths, digest, report, reused=False)


PAIR_DATA_VERSION = 1  # bump when the same inputs would give different pair lines


def _prepare_tokenizer(plan: Any, folder: Any) -> Any:
    """The plan's tokenizer, as the SFT compose builds it; one trained on the data reads the pairs' text."""
    from impruver.components import tokenizer_needs_texts
    from impruver.data.pipeline import check_special_tokens
    from impruver.data.tokenizers import build_tokenizer

    texts = _pair_texts(plan) if tokenizer_needs_texts(plan.tokenizer.builder) else None
    tokenizer = build_tokenizer(plan.tokenizer, texts=texts)
    check_special_tokens(plan, tokenizer)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _pair_texts(plan: Any) -> Any:
    """Every message of every usable record of the sources (a record that fails is the compose's to report)."""
    from impruver import registry
    from impruver.data import convert
    from impruver.data.pipeline import BPE_SAMPLE_CHARS
    from impruver.data.sources import iter_items

    budget = BPE_SAMPLE_CHARS
    for name, spec in plan.sources.items():
        func = registry.lookup("formats", spec.format)
        for _, payload in iter_items(spec, name=name, seed=plan.dataset.seed):
            try:
                record = convert.parse_payload(payload)
                records = func(convert._mapped(record, dict(spec.mapping)) if spec.mapping else record,
                               **spec.options)
            except (RecordError, SkipRecord):
                continue
            for r in records:
                text = "\n".join(m["content"] for k in ("prompt", "chosen", "rejected", "completion")
                                 for m in r.get(k) or [])
                budget -= len(text)
                yield text
                if budget <= 0:
                    return


def _encoder(tokenizer: Any) -> Any:
    """The SFT encoder (renderer from the composed tokenizer's template), as the compose workers build it."""
    from impruver.data.render import Encoder, Renderer
    from impruver.data.tokenizers import special_tokens_of

    return Encoder(tokenizer, Renderer.from_template(tokenizer.chat_template, special_tokens_of(tokenizer)))


def _source_units(plan: Any, name: str, spec: Any, source: dict[str, Any], on_error: str, encoder: Any, kind: str,
                  units: list[dict[str, Any]]) -> dict[str, Any]:
    """Read, convert, check and encode one source's records into ``units`` (one encoded pair or labelled answer
    each, with its dedup key); the source's counts, as the SFT compose counts them."""
    from impruver import registry
    from impruver.data import convert, dedup
    from impruver.data.sources import iter_items

    func = registry.lookup("formats", source["format"])
    produced = produces_of(func)
    counts = convert.new_counts()
    for where, payload in iter_items(spec, name=name, seed=plan.dataset.seed):
        counts["loaded"] += 1
        try:
            record = convert.parse_payload(payload)
            if source["mapping"]:
                record = convert._mapped(record, source["mapping"])
            records = func(record, **source["options"])
            if produced == PAIR and kind == LABELLED:
                records = [r for pair in records for r in unpair(pair)]
        except SkipRecord as skip:
            counts["skipped"][skip.reason] += 1
            continue
        except RecordError as exc:
            convert.fail(exc, where, source, on_error, counts)
            continue
        for record in records:
            counts["converted"] += 1
            record = {**record, "prompt": _with_system(_system_of(source), record["prompt"])}
            encoded = (encode_pair if kind == PAIR else encode_labelled)(encoder, record, source["render"])
            if isinstance(encoded, RecordError):
                convert.count_or_fail(encoded, where, source, on_error, counts)
                continue
            units.append({"source": name, "line": encoded, "key": dedup.exact_key(_dedup_text(record))})
    return counts


def _system_of(source: dict[str, Any]) -> list[Message]:
    return [{"role": "system", "content": source["system"]}] if source.get("system") else []


def _dedup_text(record: PairRecord) -> str:
    """What duplicates are judged on: the prompt without its system turn, and the answers (a pair, or a labelled
    answer with its label)."""
    import json

    prompt = [m for m in record["prompt"] if m["role"] != "system"]
    answers = [record[k] for k in ("chosen", "rejected", "completion", "label") if k in record]
    return json.dumps([_words(prompt), *[_words(a) if isinstance(a, list) else a for a in answers]],
                      ensure_ascii=False)


def _decide_units(plan: Any, units: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact duplicates out (first kept), a seeded validation split, and each source's weight as copies: the
    SFT compose's rules, on whole pairs (near-duplicate detection is not applied: preference sets share
    prompts on purpose)."""
    import numpy as np

    from impruver.data import pipeline

    spec = plan.dataset
    n = len(units)
    seen: set[int] = set()
    duplicate = np.zeros(n, dtype=bool)
    for i, unit in enumerate(units):
        if spec.dedup.exact and unit["key"] in seen:
            duplicate[i] = True
        seen.add(unit["key"])
    kept = np.flatnonzero(~duplicate)
    val = np.zeros(n, dtype=bool)
    n_val = pipeline._val_count(spec, len(kept))
    if n_val:
        val[np.random.default_rng(spec.seed).choice(kept, size=n_val, replace=False)] = True
    weights = np.array([plan.sources[u["source"]].weight for u in units], dtype=float)
    draws = np.random.default_rng([spec.seed, 1]).random(n)
    repeats = (np.floor(weights) + (draws < weights - np.floor(weights))).astype(np.int64)
    repeats[duplicate | val] = 0
    return {"duplicate": duplicate, "val": val, "repeats": repeats}


def _write_units(units: list[dict[str, Any]], decisions: dict[str, Any], work: Any) -> dict[str, Any]:
    """train.jsonl and val.jsonl in the work folder; token statistics per split (a pair's tokens: both sides)."""
    import numpy as np
    import orjson

    from impruver.data import pipeline

    lengths, trained = [], []
    for unit in units:
        sides = [unit["line"][k] for k in ("chosen", "rejected", "completion") if k in unit["line"]]
        lengths.append(sum(len(s["input_ids"]) for s in sides))
        trained.append(sum(sum(1 for x in s["labels"] if x != IGNORE) for s in sides))
    with (work / "train.jsonl").open("wb") as train, (work / "val.jsonl").open("wb") as val:
        for unit, to_val, copies in zip(units, decisions["val"], decisions["repeats"]):
            line = orjson.dumps(unit["line"]) + b"\n"
            if to_val:
                val.write(line)
            else:
                train.write(line * int(copies))
    lengths_a, trained_a = np.array(lengths, dtype=np.int64), np.array(trained, dtype=np.int64)
    return {"train": pipeline._stats(np.repeat(lengths_a, decisions["repeats"]),
                                     np.repeat(trained_a, decisions["repeats"])),
            "val": pipeline._stats(lengths_a[decisions["val"]], trained_a[decisions["val"]])}


IGNORE = -100  # impruver.record.IGNORE_INDEX (imported lazily elsewhere in this module)


def _pair_report(plan: Any, digest: str, tokenizer: Any, settings: dict[str, Any], counts: dict[str, Any],
                 units: list[dict[str, Any]], decisions: dict[str, Any], stats: dict[str, Any],
                 kind: str) -> dict[str, Any]:
    """The SFT compose report's shape (so ``show_report`` prints it), counting pairs; ``records`` names the kind."""
    import numpy as np

    from impruver.data import pipeline

    source = np.array([u["source"] for u in units])
    rows = {}
    for name, c in counts.items():
        mine = source == name if len(units) else np.zeros(0, dtype=bool)
        chosen = settings["sources"][name]
        rows[name] = {
            "format": chosen["format"] + (f" ({chosen['detected']})" if chosen["detected"] else ""),
            "loaded": c["loaded"], "converted": c["converted"], "invalid": dict(sorted(c["invalid"].items())),
            "skipped": dict(sorted(c["skipped"].items())), "too_long": c["too_long"],
            "no_trainable": c["no_trainable"], "truncated": 0, "dropped_messages": 0, "reasoning_dropped": 0,
            "duplicates": int((decisions["duplicate"] & mine).sum()), "near_duplicates": 0,
            "near_kept_by_exact_jaccard": 0,
            "kept": int(((decisions["repeats"] > 0) | decisions["val"])[mine].sum()),
            "weighted_out": int((~decisions["duplicate"] & ~decisions["val"] & (decisions["repeats"] == 0))[mine].sum()),
            "train_samples": int(decisions["repeats"][mine].sum()), "val_samples": int(decisions["val"][mine].sum()),
        }
    return {
        "fingerprint": digest, "data_version": PAIR_DATA_VERSION, "records": kind,
        "train_path": str(plan.train_path), "val_path": str(plan.val_path),
        "tokenizer": {"builder": plan.tokenizer.builder, "path": plan.tokenizer.path, "vocab_size": len(tokenizer),
                      "chat_template": plan.tokenizer.chat_template or "(the tokenizer's own)"},
        "settings": {"max_tokens": plan.max_tokens, "length_policy": plan.dataset.length_policy,
                     "on_error": plan.dataset.on_error, "seed": plan.dataset.seed,
                     "dedup": {"exact": plan.dataset.dedup.exact, "near": False}},
        "sources": rows, "train": stats["train"], "val": stats["val"],
    }


def read_pairs(path: Any) -> list[dict[str, Any]]:
    """The composed pair (or labelled) lines of ``path``; a line of another shape is a DataError naming it."""
    from pathlib import Path

    import orjson

    from impruver.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no composed data here; run `impruver compose` (or the main job) first")
    out = []
    with path.open("rb") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = orjson.loads(line)
            if not isinstance(record, dict) or not ({"chosen", "rejected"} <= record.keys() or "completion" in record):
                raise DataError(f"{path}:{line_no}: not a composed preference record (chosen/rejected or "
                                "completion/label); recompose with `impruver compose --force`")
            out.append(record)
    return out


def show_pairs(result: Any, count: int) -> None:
    """``compose --inspect``: ``count`` composed pairs as text, the shared prompt once, then each answer with its
    trained tokens highlighted."""
    from rich.text import Text

    from impruver.data.pipeline import _runs
    from impruver.data.tokenizers import load_pretrained
    from impruver.ui import console

    tokenizer = load_pretrained(result.tokenizer_dir)  # the composed tokenizer, as the SFT inspect loads it
    for n, record in zip(range(count), read_pairs(result.train_path)):
        sides = [(k, record[k]) for k in ("chosen", "rejected", "completion") if k in record]
        first = sides[0][1]
        start = next((i for i, x in enumerate(first["labels"]) if x != IGNORE), len(first["labels"]))
        console.rule(f"pair {n + 1}: prompt {start} tokens" if "chosen" in record else
                     f"answer {n + 1} ({'desirable' if record['label'] else 'undesirable'}): prompt {start} tokens")
        console.print(Text(tokenizer.decode(first["input_ids"][:start]), style="dim"))
        for side, sample in sides:
            text = Text(f"[{side}, {sum(1 for x in sample['labels'] if x != IGNORE)} trained] ", style="bold")
            for trained, run in _runs(sample["input_ids"][start:], sample["labels"][start:]):
                text.append(tokenizer.decode(run), style=("bold green" if side != "rejected" else "bold red")
                            if trained else "dim")
            console.print(text)


def unpair(pair: PairRecord) -> list[PairRecord]:
    """A pair as two labelled records (KTO on paired data, as TRL's ``unpair_preference_dataset``)."""
    return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True, "tools": pair.get("tools")},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False, "tools": pair.get("tools")}]


__all__ = ["LABELLED", "PAIR", "alpaca_preference", "check_labelled", "check_pair", "compose_pairs",
           "encode_labelled", "encode_pair", "read_pairs", "record_kind", "show_pairs", "openai_preference", "produces_of", "sharegpt_preference", "split_shared_prompt",
           "trl_kto", "trl_preference", "unpair"]
