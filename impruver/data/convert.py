"""Records to samples for one chunk of one source: the work each worker process does.

``process_chunk`` parses, maps, converts (format), validates, renders and tokenizes a chunk, computes its
deduplication keys and writes its samples to a shard file; it returns counts and compact numpy arrays. Workers
are set up once by ``init_worker`` (tokenizer loaded from the composed tokenizer folder, template compiled).
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from collections.abc import Iterator
from itertools import chain
from typing import Any

import numpy as np
import orjson

from impruver.data import dedup
from impruver.data.messages import (Conversation, RecordError, SkipRecord, plain_text, select_trained, validate,
                                    with_system)
from impruver.data.render import Encoder, Renderer, SourceOptions
from impruver.errors import DataError

_STATE: dict[str, Any] = {}
TOKENS_SUFFIX = ".tokens"  # beside each shard: its samples' int32 ids, then their labels (for the token store)


def init_worker(settings: dict[str, Any]) -> None:
    """Load the tokenizer and template once per process (a forked worker inherits the parent's)."""
    if _STATE.get("settings") == settings:
        return
    from impruver.data.tokenizers import load_pretrained, special_tokens_of

    tokenizer = load_pretrained(settings["tokenizer_dir"])  # AutoTokenizer's class, without torch where it can
    renderer = Renderer.from_template(tokenizer.chat_template, special_tokens_of(tokenizer))
    _STATE.update(settings=settings, encoder=Encoder(tokenizer, renderer), tokenizer=tokenizer)
    # The heap already holds transformers (and perhaps torch): exempt it from garbage collection, so collections
    # stay cheap and forked workers do not copy every page they would scan.
    gc.freeze()


def _format_func(name: str) -> Any:
    from impruver import registry

    return registry.lookup("formats", name)


def convert_items(items: list[tuple[str, Any]], source: dict[str, Any], on_error: str,
                  counts: dict[str, Any]) -> Iterator[tuple[str, Conversation]]:
    """(where, conversation) for each usable conversation of ``items``; problems raised or counted."""
    func = _format_func(source["format"])
    mapping: dict[str, str] = source["mapping"]
    for where, payload in items:
        counts["loaded"] += 1
        try:
            record = parse_payload(payload)
            if mapping:
                record = _mapped(record, mapping)
            conversations = _call_format(func, record, source["options"])
            checked = []
            for k, conversation in enumerate(conversations):
                at = where if len(conversations) == 1 else f"{where} (conversation {k})"
                conversation = select_trained(validate(conversation, "record"), source.get("roles_to_train"),
                                              source.get("train_on_last_turn_only", False))
                checked.append((at, with_system(conversation, source["system"])))
        except SkipRecord as skip:
            counts["skipped"][skip.reason] += 1
            continue
        except RecordError as exc:
            fail(exc, where, source, on_error, counts)
            continue
        counts["converted"] += len(checked)
        yield from checked


def _call_format(func: Any, record: dict[str, Any], options: dict[str, Any]) -> list[Conversation]:
    """The format's conversations; a crash on an odd record (a plugin's KeyError...) becomes a RecordError."""
    try:
        conversations = func(record, **options)
    except (RecordError, SkipRecord):
        raise
    except Exception as exc:
        raise RecordError("format_error", f"the format failed on this record: {type(exc).__name__}: {exc}") from None
    if not isinstance(conversations, list):
        raise RecordError("format_error", f"the format returned {type(conversations).__name__}, not a list of "
                                          "conversations")
    return conversations


def fail(exc: RecordError, where: str, source: dict[str, Any], on_error: str, counts: dict[str, Any]) -> None:
    """Raise a DataError naming the record (on_error=raise) or count the reason (on_error=skip)."""
    if on_error == "skip":
        counts["invalid"][exc.reason] += 1
        return
    detail = exc.detail.removeprefix("record: ")
    raise DataError(f"{where}: {detail} (source '{source['name']}', format '{source['format']}'). Fix the "
                    "record, or set dataset.on_error=skip to count and leave out such records.")


# Encoding outcomes that are counts in the report, not errors: the sample does not fit, or trains on nothing.
_COUNTED = {"too_long": "too_long", "no_trainable_tokens": "no_trainable"}


def count_or_fail(exc: RecordError, where: str, source: dict[str, Any], on_error: str,
                  counts: dict[str, Any]) -> None:
    """A record the encoder refused: a length or no-trainable-token count, else :func:`fail`."""
    key = _COUNTED.get(exc.reason)
    if key is not None:
        counts[key] += 1
    else:
        fail(exc, where, source, on_error, counts)


def parse_payload(payload: Any) -> dict[str, Any]:
    """A record from a JSON line (bytes or text) or a record dict.

    Raises:
        RecordError: invalid UTF-8 or JSON, or JSON that is not an object.
    """
    if isinstance(payload, bytes):  # a JSON line as read from the file: orjson reads UTF-8 bytes as they are
        try:
            payload = orjson.loads(payload)
        except orjson.JSONDecodeError:
            payload = _decoded(payload)  # invalid UTF-8 is named here; other problems below
    if isinstance(payload, str):
        try:
            payload = orjson.loads(payload)  # several times faster; strict RFC 8259, same values
        except orjson.JSONDecodeError:
            payload = _parse_lenient(payload)
    if not isinstance(payload, dict):
        raise RecordError("not_an_object", f"a record must be a JSON object, not {type(payload).__name__}")
    return payload


def _decoded(line: bytes) -> str:
    """A line's text; invalid UTF-8 is a RecordError naming the byte and its column."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError("invalid_utf8", f"byte 0x{line[exc.start]:02x} at column {exc.start + 1} is not UTF-8 "
                                          "(save the file as UTF-8)") from None


def _parse_lenient(payload: str) -> Any:
    """What orjson refuses, through the standard library: NaN and Infinity, lone surrogates, integers beyond
    64 bits are still read as before, and broken JSON gets the standard library's message."""
    try:
        # Without its line end: json would place an error at the end of a cut line on "line 2, column 1".
        return json.loads(payload.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise RecordError("broken_json", f"not valid JSON ({exc.msg} at column {exc.colno})") from None


def _mapped(record: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    missing = [src for src in mapping if src not in record]
    if missing:
        fields = ", ".join(sorted(map(str, record))) or "none"
        raise RecordError("missing_field", f"no field '{missing[0]}' named in the source's mapping (the record "
                                           f"has: {fields})")
    return {mapping.get(k, k): v for k, v in record.items()}


def new_counts() -> dict[str, Any]:
    return {"loaded": 0, "converted": 0, "invalid": Counter(), "skipped": Counter(), "too_long": 0,
            "no_trainable": 0, "truncated": 0, "dropped_messages": 0, "reasoning_dropped": 0}


def process_chunk(task: tuple[int, str, list[tuple[str, Any]], str]) -> dict[str, Any]:
    """One chunk: convert, encode, dedup keys; samples written to ``shard`` (one JSON line per sample)."""
    _chunk_id, name, items, shard = task
    settings = _STATE["settings"]
    source = settings["sources"][name]
    options: SourceOptions = source["render"]
    counts = new_counts()
    converted = list(convert_items(items, source, settings["on_error"], counts))
    encoded = _STATE["encoder"].encode([c for _, c in converted], options)
    units: list[tuple[str, list[Any]]] = []
    for (where, conversation), result in zip(converted, encoded):
        if isinstance(result, RecordError):
            count_or_fail(result, where, source, settings["on_error"], counts)
            continue
        for sample in result:  # what the length policy and the template left out, for the report
            counts["truncated"] += sample.dropped_messages > 0
            counts["dropped_messages"] += sample.dropped_messages
            counts["reasoning_dropped"] += sample.reasoning_dropped
        units.append((_dedup_text(conversation), result))
    return {"source": name, "counts": counts, **_write_shard(units, shard, settings["dedup"])}


def _dedup_text(conversation: Conversation) -> str:
    """What duplicates are judged on: the conversation without its system prompt (often shared by all)."""
    if "text" in conversation:
        return conversation["text"]
    return plain_text({"messages": [m for m in conversation["messages"] if m["role"] != "system"]})


def _write_shard(units: list[tuple[str, list[Any]]], shard: str, settings: dict[str, Any]) -> dict[str, Any]:
    n = len(units)
    texts = [text for text, _ in units]
    exact = np.fromiter((dedup.exact_key(text) for text in texts), dtype=np.uint64, count=n)
    bands = sigs = shingled = shingle_counts = None
    if settings["near"]:  # the whole chunk's MinHash signatures in one numpy pass
        sigs = dedup.signatures(texts, num_perm=settings["num_perm"], shingle_size=settings["shingle_size"])
        bands = dedup.band_keys_of(sigs, settings["bands"], settings["rows"])
        # The shingle sets themselves (8 bytes a word), for the exact Jaccard of the pairs the estimate flags.
        shingled, shingle_counts = dedup.shingle_sets(texts, shingle_size=settings["shingle_size"])
    per_unit = np.fromiter((len(samples) for _, samples in units), dtype=np.int32, count=n)
    samples = [sample for _, unit_samples in units for sample in unit_samples]
    sizes = np.zeros(len(samples), dtype=np.int64)  # bytes of each line
    with open(shard, "wb") as handle:  # line by line: a long document's lines together are tens of MB
        for k, sample in enumerate(samples):
            line = _line(sample.input_ids, sample.labels)
            handle.write(line)
            sizes[k] = len(line)
    with open(shard + TOKENS_SUFFIX, "wb") as handle:  # the same samples for the token store: all ids, then labels
        for part in ("input_ids", "labels"):
            handle.write(_int32(getattr(s, part) for s in samples).tobytes())
    return {"exact": exact, "bands": bands, "sigs": sigs, "shingles": shingled, "shingle_counts": shingle_counts,
            "per_unit": per_unit, "sizes": sizes,
            "lengths": np.fromiter((len(s.input_ids) for s in samples), dtype=np.int32, count=len(samples)),
            "trainable": np.fromiter((s.trainable for s in samples), dtype=np.int32, count=len(samples))}


def _int32(parts: Iterator[list[int] | np.ndarray]) -> np.ndarray:
    """Samples' ids (or labels) one after another as one int32 array: lists (chats) read as one stream, arrays
    (raw text) copied as they are."""
    pieces: list[np.ndarray] = []
    lists: list[list[int]] = []  # consecutive lists, read together
    for part in parts:
        if isinstance(part, np.ndarray):
            if lists:
                pieces.append(np.fromiter(chain.from_iterable(lists), dtype=np.int32))
                lists = []
            pieces.append(part.astype(np.int32, copy=False))
        else:
            lists.append(part)
    if lists:
        pieces.append(np.fromiter(chain.from_iterable(lists), dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def _line(ids: list[int] | np.ndarray, labels: list[int] | np.ndarray) -> bytes:
    """One sample as a JSON line: keys in a fixed order, compact separators (orjson writes exactly what
    ``json.dumps(..., separators=(",", ":"))`` does for lists of ints, and numpy int arrays as those lists), so
    the same sample gives the same bytes."""
    return orjson.dumps({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)},
                        option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY)
