"""`impruver compose`: a mix of datasets into training and validation sets.

Recipe: fingerprint -> (reuse) -> tokenizer -> stream every source in chunks through the worker processes
(convert, render, tokenize, mask, dedup keys; samples to shard files) -> exact and near dedup across all sources
-> seeded split -> weights -> train / val token stores and JSONL, tokenizer folder and ``compose_report.json``
published atomically. Nothing is published when anything fails.

Outputs (beside ``plan.train_path``): the train and val token stores (``train.ids.npy``, ``train.labels.npy``,
``train.offsets.npy``, see :mod:`impruver.data.store`: what training memory-maps and every rank shares), the same
samples as JSONL for other tools (``{"input_ids", "labels", "attention_mask"}`` per line, labels -100 where not
trained), ``tokenizer/`` (the final tokenizer with its chat template) and ``compose_report.json`` (counts per
source, token statistics, the fingerprint).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from impruver.data import convert, dedup
from impruver.data.render import IGNORE_INDEX, SourceOptions
from impruver.data.sources import fingerprint_source, iter_items
from impruver.errors import DataError, RunError
from impruver.ui import console, log

DATA_VERSION = 2  # bump when the same inputs would give different outputs
CHUNK = 512  # records per task sent to a worker, at most
CHUNK_BYTES = 4 << 20  # and at most about this many bytes of JSON lines (a long document is a task of its own)
IN_FLIGHT_BYTES = 8 << 20  # input handed to the workers and not yet back, at most (a worker's memory follows it)
POOL_MIN_CHUNKS = 3  # fewer chunks are processed here: forking workers would cost more memory than it saves time
REPORT = "compose_report.json"
TOKENIZER_DIR = "tokenizer"


@dataclass
class ComposeResult:
    """Where the composed data is, and whether it was reused from an earlier run."""

    train_path: Path
    val_path: Path
    report_path: Path
    tokenizer_dir: Path
    fingerprint: str
    reused: bool
    report: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase (not saved: outputs stay identical)


# -- public entry points ----------------------------------------------------------------------------------------


def run(plan: Any, *, force: bool = False, inspect: int | str | None = None,
        export_messages: str | None = None) -> ComposeResult:
    """The `impruver compose` stage: compose (or reuse), print the report, optionally show samples.

    Args:
        plan: the validated plan.
        force: recompose even when the fingerprint matches.
        inspect: show this many rendered training samples with the trained tokens highlighted.
        export_messages: also write every source's conversations, as converted, to this JSONL file (see
            :func:`write_messages`): e.g. OpenAssistant trees as flat chats.
    """
    if export_messages:
        counts = write_messages(plan, export_messages)
        log.info("wrote %d conversations to %s (%s)", sum(counts.values()), export_messages,
                 ", ".join(f"{name}: {n}" for name, n in counts.items()))
    result = compose(plan, force=force)
    show_report(result.report, reused=result.reused)
    if inspect:
        show_samples(result, int(inspect))
    return result


def ensure_composed(plan: Any) -> ComposeResult:
    """Compose only when the fingerprint of sources, settings, tokenizer and template changed (for training)."""
    return compose(plan, force=False)


def load_composed_tokenizer(plan: Any) -> Any:
    """The tokenizer saved by the last compose of this plan (chat template and special tokens included)."""
    from impruver.data.tokenizers import load_pretrained

    folder = paths_of(plan)["tokenizer"]
    if not (folder / "tokenizer_config.json").is_file():
        raise RunError(f"no composed tokenizer at {folder}: run `impruver compose` first")
    return load_pretrained(folder)


def paths_of(plan: Any) -> dict[str, Path]:
    data = Path(plan.train_path).parent
    return {"train": Path(plan.train_path), "val": Path(plan.val_path), "report": data / REPORT,
            "tokenizer": data / TOKENIZER_DIR, "data": data}


def write_messages(plan: Any, path: str | os.PathLike[str]) -> dict[str, int]:
    """Write every source's conversations, as the formats convert them, to ``path``: one conversation a line
    (``{"messages": [{"role", "content"}...], "tools": [...]}``, or ``{"text": ...}`` for raw text), in source
    order. This is the flat chat form of any format, e.g. OpenAssistant trees (``format: oasst``, with its
    ``branch`` and rank options) as plain chats that other tools read.

    What the conversion decides is kept: the source's mapping, system prompt, ``roles_to_train`` /
    ``train_on_last_turn_only`` (a turn kept out of the loss gets ``"weight": 0``) and reasoning
    (``reasoning_content``). Tool calls stay impruver's ``function_call`` / ``function_response`` turns. Read back
    with ``format: openai``, the file gives the same conversations. Nothing here is tokenized, deduplicated or
    split: that is compose's work. Records that fail follow ``dataset.on_error``. The file is replaced atomically.

    Returns:
        conversations written per source.
    """
    import orjson

    settings = _settings(plan, Path("."))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    written: dict[str, int] = {}
    try:
        with tmp.open("wb") as out:
            for name, spec in plan.sources.items():
                counts = convert.new_counts()
                items = iter_items(spec, name=name, seed=plan.dataset.seed)
                written[name] = 0
                for _, conversation in convert.convert_items(items, settings["sources"][name],
                                                             plan.dataset.on_error, counts):
                    out.write(orjson.dumps(_flat(conversation), option=orjson.OPT_APPEND_NEWLINE))
                    written[name] += 1
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return written


def _flat(conversation: dict[str, Any]) -> dict[str, Any]:
    """A canonical conversation as an OpenAI-style record that ``format: openai`` reads back unchanged."""
    if "text" in conversation:
        return {"text": conversation["text"]}
    messages = []
    for message in conversation["messages"]:
        flat = {"role": message["role"], "content": message["content"]}
        if message.get("reasoning"):
            flat["reasoning_content"] = message["reasoning"]
        if message.get("train") is False:
            flat["weight"] = 0
        messages.append(flat)
    return {"messages": messages, **({"tools": conversation["tools"]} if conversation.get("tools") else {})}


# -- fingerprint ---------------------------------------------------------------------------------------------------


def fingerprint(plan: Any) -> str:
    """sha256 of everything the outputs depend on: sources' content, dataset settings, tokenizer, template."""
    from impruver.components import tokenizer_reads_path
    from impruver.data.templates import resolve_template

    tok = plan.tokenizer
    dataset = plan.dataset.model_dump(mode="json")
    dataset.pop("num_proc", None)  # outputs do not depend on the number of processes
    payload = {
        "version": DATA_VERSION,
        "dataset": dataset,
        "max_tokens": plan.max_tokens,
        "tokenizer": tok.model_dump(mode="json"),
        "template": resolve_template(tok.chat_template) if tok.chat_template else None,
        "tokenizer_files": _folder_digest(tok.path) if tokenizer_reads_path(tok.builder) and tok.path else None,
        "sources": {name: fingerprint_source(spec, name) for name, spec in plan.sources.items()},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _folder_digest(path: str) -> str | None:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None  # a Hub id: its name (in the spec) is what identifies it
    hasher = xxhash.xxh64()
    for file in sorted(folder.iterdir()):
        if file.is_file() and (file.suffix in (".json", ".txt", ".model", ".jinja") or "token" in file.name):
            hasher.update(file.name.encode())
            hasher.update(file.read_bytes())
    return hasher.hexdigest()


def _up_to_date(paths: dict[str, Path], digest: str) -> dict[str, Any] | None:
    """The saved report when every output exists and was made from the same fingerprint."""
    from impruver.data.store import has_store

    if not all(paths[k].exists() for k in ("train", "val", "report", "tokenizer")):
        return None
    if not (has_store(paths["train"]) and has_store(paths["val"])):
        return None
    try:
        report = json.loads(paths["report"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if report.get("fingerprint") == digest else None


# -- the recipe ----------------------------------------------------------------------------------------------------


def compose(plan: Any, *, force: bool = False) -> ComposeResult:
    """Compose the plan's dataset, or reuse the last composition when nothing it depends on changed."""
    if _preference(plan):  # pairs (or labelled answers) for a preference objective: their own path, same rules
        from impruver.data.preference import compose_pairs

        return compose_pairs(plan, force=force)
    paths = paths_of(plan)
    digest = fingerprint(plan)
    saved = None if force else _up_to_date(paths, digest)
    if saved is not None:
        log.info("dataset up to date (fingerprint %s): reusing %s", digest[:12], paths["data"])
        return _result(paths, digest, saved, reused=True)
    settings = _settings(plan, Path())  # formats chosen (format auto reads the first records) before any folder
    clock = _Clock()
    with compose_work(paths) as work:
        settings["tokenizer_dir"] = str(work / TOKENIZER_DIR)
        tokenizer = clock("tokenizer", _prepare_tokenizer, plan, work / TOKENIZER_DIR)
        collected = clock("process", _process_sources, plan, settings, work)
        decisions = clock("dedup_split", _decide, plan, collected)
        stats = clock("write", _write_outputs, collected, decisions, work)
        report = _report(plan, digest, tokenizer, collected, decisions, stats, settings)
        if not report["train"]["samples"]:
            raise DataError("no training sample is left after composition: " + "; ".join(
                f"{name}: {row['loaded']} loaded, {sum(row['invalid'].values())} invalid, "
                f"{sum(row['skipped'].values())} skipped, {row['too_long']} too long (max_tokens {plan.max_tokens}), "
                f"{row['duplicates']} duplicates" for name, row in report["sources"].items()))
        clock("publish", _publish, paths, work, report)
    result = _result(paths, digest, report, reused=False)
    result.seconds = clock.seconds
    log.info("composed %d train / %d val samples (%d / %d tokens) in %.1f s: %s", report["train"]["samples"],
             report["val"]["samples"], report["train"]["tokens"], report["val"]["tokens"],
             sum(clock.seconds.values()), paths["data"])
    return result


@contextmanager
def compose_work(paths: dict[str, Path]) -> Iterator[Path]:
    """A private work folder inside the data folder for one compose (what it writes before publishing), removed
    after; a data folder made for it is removed too when the compose fails and leaves it empty: a failed compose
    leaves nothing behind."""
    made = not paths["data"].exists()
    paths["data"].mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".compose-", dir=paths["data"]))
    done = False
    try:
        yield work
        done = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if made and not done and not any(paths["data"].iterdir()):
            paths["data"].rmdir()


class _Clock:
    """Times the phases of a compose (for the log and the benchmark)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, func: Any, *args: Any) -> Any:
        import time

        start = time.perf_counter()
        value = func(*args)
        self.seconds[name] = round(time.perf_counter() - start, 3)
        log.debug("compose %s: %.2f s", name, self.seconds[name])
        return value


def _preference(plan: Any) -> bool:
    from impruver.objectives import objective_of

    return bool(objective_of(plan).preference)


def _result(paths: dict[str, Path], digest: str, report: dict[str, Any], reused: bool) -> ComposeResult:
    return ComposeResult(paths["train"], paths["val"], paths["report"], paths["tokenizer"], digest, reused, report)


def _settings(plan: Any, tokenizer_dir: Path) -> dict[str, Any]:
    """Everything a worker needs, as plain picklable values."""
    spec = plan.dataset.dedup
    bands, rows = dedup.lsh_params(spec.threshold, spec.num_perm)
    sources = {}
    for name, src in plan.sources.items():
        limit = min(src.max_tokens or plan.max_tokens, plan.max_tokens)
        fmt, options, detected = resolve_format(src, name, plan.dataset.seed)
        sources[name] = {
            "name": name, "format": fmt, "options": options, "mapping": dict(src.mapping),
            "system": src.system, "detected": detected,
            "render": SourceOptions(src.only_target_loss, src.add_bos, src.add_eos, limit, plan.dataset.length_policy),
            **_trained_turns(src, name),
        }
    return {"tokenizer_dir": str(tokenizer_dir), "sources": sources, "on_error": plan.dataset.on_error,
            "dedup": {"near": spec.near, "num_perm": spec.num_perm, "shingle_size": spec.shingle_size,
                      "bands": bands, "rows": rows}}


def resolve_format(src: Any, name: str, seed: int) -> tuple[str, dict[str, Any], str]:
    """A source's format and options, and how they were chosen: as configured; from LLaMA-Factory's
    dataset_info.json entry (``formatting``, ``columns``, ``tags``) for ``format: auto``; or, for ``format: auto``,
    detected from the fields of its first records.

    Raises:
        DataError: format auto on records no known format fits.
    """
    from impruver.data import formats
    from impruver.data.messages import RecordError
    from impruver.data.sources import dataset_info_entry

    key = f"dataset.sources.{name}"
    listed = dataset_info_entry(src, f"{key}.path")
    if src.format != "auto":
        return src.format, dict(src.options), ""
    if listed is not None:
        fmt, options = _llamafactory_format(listed[1], f"{key}.subset")
        return fmt, {**options, **src.options}, f"LLaMA-Factory formatting '{listed[1].get('formatting', 'alpaca')}'"
    from itertools import islice

    first, broken = [], None
    for where, payload in islice(iter_items(src, name=name, seed=seed), DETECT_RECORDS):
        try:
            first.append(convert.parse_payload(payload))
        except RecordError as exc:  # a broken record is the converter's to report, with its line...
            broken = broken or (where, exc.detail.removeprefix("record: "))
    if broken and not first:  # ...unless no record is left to choose the format from: then it is the problem
        raise DataError(f"{broken[0]}: {broken[1]} (source '{name}', format auto). Fix the record: format auto "
                        f"chooses the format from the first records and could read none of the first "
                        f"{DETECT_RECORDS} (with the format named, dataset.on_error=skip leaves such records out).")
    try:
        fmt, looks = formats.detect_format(first)
    except RecordError as exc:
        raise DataError(f"{key}.format: auto: {exc.detail}") from None
    log.info("%s: format auto -> %s (the first %d records have %s)", key, fmt, len(first), looks)
    return fmt, dict(src.options), f"detected: {looks}"


DETECT_RECORDS = 20  # records format auto reads to choose a source's format


def _llamafactory_format(entry: dict[str, Any], key: str) -> tuple[str, dict[str, Any]]:
    """impruver's format and options for a dataset_info.json entry."""
    columns, tags = entry.get("columns") or {}, entry.get("tags") or {}
    formatting = entry.get("formatting", "alpaca")
    if entry.get("ranking") or {"chosen", "rejected", "kto_tag"} & columns.keys():
        raise DataError(f"{key}: '{entry.get('file_name', entry.get('hf_hub_url'))}' holds preference pairs; "
                        "impruver composes supervised data only")
    if formatting == "alpaca":
        names = {"prompt": "instruction_field", "query": "input_field", "response": "output_field",
                 "system": "system_field", "history": "history_field"}
        return "instruct", {names[k]: v for k, v in columns.items() if k in names}
    if formatting == "sharegpt":
        names = {"messages": "field", "tools": "tools_field", "system": "system_field"}
        options = {names[k]: v for k, v in columns.items() if k in names}
        return "sharegpt", {**options, **{k: v for k, v in tags.items() if k.endswith("_tag")}}
    raise DataError(f"{key}: LLaMA-Factory formatting '{formatting}' is not one impruver reads (alpaca, sharegpt)")


def _trained_turns(src: Any, name: str) -> dict[str, Any]:
    """Which of the model's turns a source trains: ``roles_to_train`` (assistant, function_call) and
    ``train_on_last_turn_only``, read from the source when its schema has them."""
    from impruver.data.messages import TRAINABLE_ROLES
    from impruver.errors import ConfigError, Problem

    roles = getattr(src, "roles_to_train", None)
    if roles is not None and not set(roles) <= TRAINABLE_ROLES:
        raise ConfigError([Problem(f"dataset.sources.{name}.roles_to_train",
                                   f"{sorted(set(roles) - TRAINABLE_ROLES)} are not the model's turns; choose from "
                                   f"{', '.join(sorted(TRAINABLE_ROLES))}")])
    return {"roles_to_train": frozenset(roles) if roles is not None else None,
            "train_on_last_turn_only": bool(getattr(src, "train_on_last_turn_only", False))}


def _prepare_tokenizer(plan: Any, folder: Path) -> Any:
    """Build the plan's tokenizer (a BPE is trained on the sources' text) and save it for the workers."""
    from impruver.data.tokenizers import build_tokenizer, save_tokenizer

    from impruver.components import tokenizer_needs_texts

    texts = _training_texts(plan) if tokenizer_needs_texts(plan.tokenizer.builder) else None
    tokenizer = build_tokenizer(plan.tokenizer, texts=texts)
    check_special_tokens(plan, tokenizer)
    save_tokenizer(tokenizer, folder)  # under a class every transformers since 4.57 loads (other tools read it)
    return tokenizer


def check_special_tokens(plan: Any, tokenizer: Any) -> None:
    """Every source's add_bos / add_eos needs the token: refused once, naming each source, before any record is
    read (not as every record invalid).

    Raises:
        ConfigError: a source adds a BOS or EOS the tokenizer does not have.
    """
    from impruver.errors import ConfigError, Problem

    problems = [Problem(f"dataset.sources.{name}.add_{kind}",
                        f"the tokenizer has no {kind}_token to add; give one in tokenizer.special_tokens "
                        f"({{{kind}_token: ...}}) or drop add_{kind}")
                for name, src in plan.sources.items() for kind in ("bos", "eos")
                if getattr(src, f"add_{kind}") and getattr(tokenizer, f"{kind}_token_id") is None]
    if problems:
        raise ConfigError(problems)


BPE_SAMPLE_CHARS = 100_000_000  # characters of text a BPE is trained on, at most (a bounded sample stream)


def _training_texts(plan: Any) -> Iterator[str]:
    """The sources' message text, streamed for training a BPE: the sources in turn, one conversation each, so a
    large first source does not fill the sample alone; at most BPE_SAMPLE_CHARS characters. (A BPE's merges come
    from word counts, so the order does not change the tokenizer when everything fits.)"""
    settings = _settings(plan, Path("."))
    streams = [_source_texts(plan, name, spec, settings["sources"][name]) for name, spec in plan.sources.items()]
    budget = BPE_SAMPLE_CHARS
    while streams and budget > 0:
        for stream in list(streams):
            text = next(stream, None)
            if text is None:
                streams.remove(stream)
                continue
            budget -= len(text)
            yield text
    if streams:
        log.info("the BPE is trained on the first %d characters of the sources, taken in turn", BPE_SAMPLE_CHARS)


def _source_texts(plan: Any, name: str, spec: Any, source: dict[str, Any]) -> Iterator[str]:
    counts = convert.new_counts()
    items = iter_items(spec, name=name, seed=plan.dataset.seed)
    for _, conversation in convert.convert_items(items, source, plan.dataset.on_error, counts):
        if "text" in conversation:
            yield conversation["text"]
        else:
            yield "\n".join(m["content"] for m in conversation["messages"])


Task = tuple[int, str, list[tuple[str, Any]], str]  # (index, source, records, shard file): what a worker gets


def _tasks(plan: Any, work: Path) -> Iterator[tuple[Task, int]]:
    """Chunks of records, source after source, each with the shard file its samples go to, and its size in bytes
    (of JSON lines as read; records read as objects are estimated from their text)."""
    index = 0
    for name, spec in plan.sources.items():
        chunk: list[tuple[str, Any]] = []
        size = 0
        for item in iter_items(spec, name=name, seed=plan.dataset.seed):
            chunk.append(item)
            size += _size_of(item[1])
            if len(chunk) == CHUNK or size >= CHUNK_BYTES:
                yield (index, name, chunk, str(work / f"shard-{index:07d}.jsonl")), size
                index, chunk, size = index + 1, [], 0
        if chunk:
            yield (index, name, chunk, str(work / f"shard-{index:07d}.jsonl")), size
            index += 1


def _size_of(value: Any, depth: int = 0) -> int:
    """About the bytes of a record: a JSON line's length, or the lengths of the strings in a parsed record."""
    if isinstance(value, (bytes, str)):
        return len(value)
    if depth < 4 and isinstance(value, dict):
        return sum(_size_of(v, depth + 1) for v in value.values())
    if depth < 4 and isinstance(value, list):
        return sum(_size_of(v, depth + 1) for v in value)
    return 8


def _process_sources(plan: Any, settings: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run every chunk (in worker processes when there is more than one chunk and more than one core)."""
    collected = _Collector(list(plan.sources), work, settings["dedup"]["num_perm"])
    tasks = _tasks(plan, work)
    head = [t for _, t in zip(range(POOL_MIN_CHUNKS), tasks)]
    processes = plan.dataset.num_proc or _cores()
    convert.init_worker(settings)  # here first: forked workers inherit the loaded tokenizer and imports
    if processes < 2 or len(head) < POOL_MIN_CHUNKS:
        for task, _ in chain(head, tasks):  # one chunk in memory at a time (a list would read every source)
            collected.add(task[3], convert.process_chunk(task))
    else:
        _run_pool(settings, [*head], tasks, processes, collected)
    return collected.finish()


def _cores() -> int:
    """CPU cores this process may use (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _run_pool(settings: dict[str, Any], head: list[Any], tasks: Iterator[Any], processes: int,
              collected: _Collector) -> None:
    """Chunks handed to the workers as they are read, results collected in order. In flight at once: at most two
    chunks per worker and IN_FLIGHT_BYTES of input (one chunk always), so the workers' memory together is
    bounded whatever the input: short chats fill every worker, long documents go one or two at a time."""
    import multiprocessing as mp

    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; the workers are the parallelism
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    gc.freeze()  # forked workers then share the parent's pages instead of copying what a collection touches
    pool = mp.get_context(method).Pool(processes, initializer=convert.init_worker, initargs=(settings,))
    try:
        pending: deque[tuple[str, Any, int]] = deque()
        in_flight = 0  # input bytes of the pending chunks
        for task, size in chain(head, tasks):  # lazily: read no further ahead than the window
            while pending and (len(pending) >= 2 * processes or in_flight + size > IN_FLIGHT_BYTES):
                shard, handle, done = pending.popleft()
                collected.add(shard, handle.get())
                in_flight -= done
            pending.append((task[3], pool.apply_async(_process_in_worker, (task, size)), size))
            in_flight += size
        while pending:
            shard, handle, _ = pending.popleft()
            collected.add(shard, handle.get())
        pool.close()
    finally:
        pool.terminate()
        pool.join()
        gc.unfreeze()
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _process_in_worker(task: Task, size: int) -> dict[str, Any]:
    """One chunk in a worker; after a large one (long documents) the freed heap goes back to the system, so an
    idle worker does not keep the high-water mark of its last document."""
    result = convert.process_chunk(task)
    if size >= CHUNK_BYTES // 4:
        gc.collect()
        _trim_heap()
    return result


def _trim_heap() -> None:
    """glibc's malloc_trim(0): return free heap pages to the system (a no-op elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Collector:
    """Per-chunk results gathered into per-source counts and flat numpy arrays (signatures go to disk)."""

    def __init__(self, names: list[str], work: Path, num_perm: int) -> None:
        self.names = names
        self.counts = {n: convert.new_counts() for n in names}
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in ("exact", "bands", "per_unit", "lengths",
                                                                   "trainable", "source", "sizes",
                                                                   "shingle_counts")}
        self.shards: list[str] = []
        self.shard_samples: list[int] = []  # samples (lines) in each shard
        self.num_perm = num_perm
        self.sig_path = work / "signatures.u32"
        self.sig_file = self.sig_path.open("wb")
        self.shingle_path = work / "shingles.u64"  # every unit's shingle hashes, for exact Jaccard checks
        self.shingle_file = self.shingle_path.open("wb")

    def add(self, shard: str, result: dict[str, Any]) -> None:
        counts = self.counts[result["source"]]
        for key, value in result["counts"].items():
            counts[key] += value
        for key in ("exact", "per_unit", "lengths", "trainable", "sizes"):
            self.parts[key].append(result[key])
        if result["bands"] is not None:
            self.parts["bands"].append(result["bands"])
            self.sig_file.write(result["sigs"].tobytes())
            self.parts["shingle_counts"].append(result["shingle_counts"])
            self.shingle_file.write(result["shingles"].tobytes())
        self.parts["source"].append(np.full(len(result["exact"]), self.names.index(result["source"]), np.int32))
        self.shards.append(shard)
        self.shard_samples.append(len(result["sizes"]))

    def finish(self) -> dict[str, Any]:
        self.sig_file.close()
        self.shingle_file.close()
        near = bool(self.parts["bands"])
        flat = {}
        for key in list(self.parts):  # each key's pieces freed once joined: the peak is one copy plus one key
            pieces = self.parts.pop(key)
            flat[key] = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
            del pieces
        units = len(flat["exact"])
        signatures = shingled = None
        if near and units:
            signatures = np.memmap(self.sig_path, dtype=np.uint32, mode="r", shape=(units, self.num_perm))
            offsets = np.r_[0, np.cumsum(flat["shingle_counts"])]  # (units + 1,)
            values = np.memmap(self.shingle_path, dtype=np.uint64, mode="r") if offsets[-1] else \
                np.zeros(0, dtype=np.uint64)
            shingled = (values, offsets)
        return {**flat, "signatures": signatures, "shingled": shingled, "counts": self.counts, "shards": self.shards,
                "shard_samples": self.shard_samples, "names": self.names}


def _decide(plan: Any, collected: dict[str, Any]) -> dict[str, np.ndarray]:
    """Which units (conversations) are duplicates, which go to validation, how often each is repeated."""
    spec = plan.dataset
    units = len(collected["exact"])
    candidates = np.ones(units, dtype=bool)
    exact_dup = dedup.first_occurrences(collected["exact"], candidates) if spec.dedup.exact else ~candidates
    candidates &= ~exact_dup
    near_dup = np.zeros(units, dtype=bool)
    near_rejected = np.zeros(units, dtype=bool)  # estimated near-duplicates that the exact Jaccard cleared
    if spec.dedup.near and collected["signatures"] is not None:
        rejected: list[int] = []
        near_dup = dedup.near_duplicates(collected["bands"], collected["signatures"], candidates,
                                         spec.dedup.threshold, collected["shingled"], rejected)
        near_rejected[rejected] = True
        candidates &= ~near_dup
    kept = np.flatnonzero(candidates)
    val = np.zeros(units, dtype=bool)
    n_val = _val_count(spec, len(kept))
    if n_val:
        val[np.random.default_rng(spec.seed).choice(kept, size=n_val, replace=False)] = True
    weights = np.array([plan.sources[n].weight for n in collected["names"]])[collected["source"]] if units else \
        np.zeros(0)
    draws = np.random.default_rng([spec.seed, 1]).random(units)  # one draw per unit, from the seed
    # Weights up- or down-sample the training set only (validation keeps the natural mix): floor(w) copies and
    # one more with probability frac(w), drawn per unit from the seed.
    repeats = (np.floor(weights) + (draws < weights - np.floor(weights))).astype(np.int64)
    repeats[~candidates | val] = 0
    return {"exact_dup": exact_dup, "near_dup": near_dup, "near_rejected": near_rejected, "val": val,
            "repeats": repeats, "candidates": candidates}


def _val_count(spec: Any, kept: int) -> int:
    if kept < 2:
        return 0
    wanted = spec.val_size if spec.val_size is not None else round((spec.val_fraction or 0) * kept)
    if wanted == 0 and spec.val_size is None and (spec.val_fraction or 0) > 0:
        wanted = 1  # asked for validation: never silently none
    return min(wanted, kept - 1)


def _write_outputs(collected: dict[str, Any], decisions: dict[str, np.ndarray], work: Path) -> dict[str, Any]:
    """Stream the shards into train.jsonl / val.jsonl and the token stores beside them (train.ids.npy, ...) in the
    work folder; token statistics per split. One shard is in memory at a time."""
    from impruver.data.store import StoreWriter, store_files

    sample_unit = np.repeat(np.arange(len(collected["per_unit"])), collected["per_unit"])  # (samples,)
    to_val = decisions["val"][sample_unit]
    copies = decisions["repeats"][sample_unit]
    lengths, trainable = collected["lengths"], collected["trainable"]
    stores = {"train": StoreWriter(store_files(work / "train.jsonl"), tokens=int(np.dot(lengths, copies)),
                                   samples=int(copies.sum())),
              "val": StoreWriter(store_files(work / "val.jsonl"), tokens=int(lengths[to_val].sum()),
                                 samples=int(to_val.sum()))}
    # Each shard is read whole and copied in runs of consecutive lines that go to the same place (line byte
    # sizes come from the workers); only lines repeated by a weight are written one by one.
    ends = np.cumsum(collected["sizes"])  # (samples,) end of each line in its shard's bytes, plus earlier shards
    with (work / "train.jsonl").open("wb") as train, (work / "val.jsonl").open("wb") as val:
        first = 0  # the shard's first sample
        for shard, count in zip(collected["shards"], collected["shard_samples"]):
            if not count:
                continue
            with open(shard, "rb") as handle:
                data = memoryview(handle.read())
            tokens = _ShardTokens(shard, lengths[first:first + count])
            base = int(ends[first - 1]) if first else 0
            stop = ends[first:first + count] - base  # (count,) end of each line in ``data``
            where = np.where(to_val[first:first + count], -1, copies[first:first + count])  # -1: validation
            edges = np.flatnonzero(where[1:] != where[:-1]) + 1
            for a, b in zip(np.r_[0, edges], np.r_[edges, count]):
                start, end = (int(stop[a - 1]) if a else 0), int(stop[b - 1])
                if where[a] == -1:
                    val.write(data[start:end])
                    stores["val"].add(*tokens.run(a, b))
                elif where[a] == 1:
                    train.write(data[start:end])
                    stores["train"].add(*tokens.run(a, b))
                elif where[a] > 1:
                    for k in range(a, b):
                        line = data[(int(stop[k - 1]) if k else 0):int(stop[k])]
                        train.write(bytes(line) * int(where[a]))
                        for _ in range(int(where[a])):
                            stores["train"].add(*tokens.run(k, k + 1))
            first += count
    for store in stores.values():
        store.close()
    return {"train": _stats(np.repeat(lengths, copies), np.repeat(trainable, copies)),
            "val": _stats(lengths[to_val], trainable[to_val])}


class _ShardTokens:
    """One shard's samples as int32 arrays (written by the worker beside the shard's JSON lines)."""

    def __init__(self, shard: str, lengths: np.ndarray) -> None:
        flat = np.fromfile(shard + convert.TOKENS_SUFFIX, dtype=np.int32)  # (2 * tokens,): ids, then labels
        self.ids, self.labels = np.split(flat, 2)
        self.lengths = lengths
        self.offsets = np.r_[0, np.cumsum(lengths, dtype=np.int64)]  # (samples + 1,)

    def run(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids, labels and lengths of the shard's samples a..b-1."""
        start, end = self.offsets[a], self.offsets[b]
        return self.ids[start:end], self.labels[start:end], self.lengths[a:b]


def _stats(lengths: np.ndarray, trainable: np.ndarray) -> dict[str, Any]:
    """Token-length statistics of one split."""
    if len(lengths) == 0:
        return {"samples": 0, "tokens": 0, "trainable_tokens": 0, "trainable_fraction": 0.0}
    total = int(lengths.sum())
    return {"samples": len(lengths), "tokens": total, "trainable_tokens": int(trainable.sum()),
            "trainable_fraction": round(int(trainable.sum()) / max(1, total), 4),
            "min": int(lengths.min()), "mean": round(float(lengths.mean()), 1),
            "p50": int(np.percentile(lengths, 50)), "p95": int(np.percentile(lengths, 95)),
            "max": int(lengths.max())}


def _report(plan: Any, digest: str, tokenizer: Any, collected: dict[str, Any], decisions: dict[str, np.ndarray],
            stats: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    sources = {}
    for i, name in enumerate(collected["names"]):
        mine = collected["source"] == i
        counts = collected["counts"][name]
        chosen = settings["sources"][name]
        sources[name] = {
            "format": chosen["format"] + (f" ({chosen['detected']})" if chosen["detected"] else ""),
            "loaded": counts["loaded"], "converted": counts["converted"],
            "invalid": dict(sorted(counts["invalid"].items())), "skipped": dict(sorted(counts["skipped"].items())),
            "too_long": counts["too_long"], "no_trainable": counts["no_trainable"],
            "truncated": counts["truncated"], "dropped_messages": counts["dropped_messages"],
            "reasoning_dropped": counts["reasoning_dropped"],
            "duplicates": int((decisions["exact_dup"] & mine).sum() + (decisions["near_dup"] & mine).sum()),
            "near_duplicates": int((decisions["near_dup"] & mine).sum()),
            "near_kept_by_exact_jaccard": int((decisions["near_rejected"] & mine).sum()),
            "kept": int(((decisions["repeats"] > 0) | decisions["val"])[mine].sum()),
            "weighted_out": int((decisions["candidates"] & ~decisions["val"] & (decisions["repeats"] == 0))[mine].sum()),
            "train_samples": int((decisions["repeats"] * collected["per_unit"])[mine].sum()),
            "val_samples": int((decisions["val"] * collected["per_unit"])[mine].sum()),
        }
    return {
        "fingerprint": digest, "data_version": DATA_VERSION,
        "train_path": str(plan.train_path), "val_path": str(plan.val_path),
        "tokenizer": {"builder": plan.tokenizer.builder, "path": plan.tokenizer.path, "vocab_size": len(tokenizer),
                      "chat_template": plan.tokenizer.chat_template or "(the tokenizer's own)"},
        "settings": {"max_tokens": plan.max_tokens, "length_policy": plan.dataset.length_policy,
                     "on_error": plan.dataset.on_error, "seed": plan.dataset.seed,
                     "dedup": plan.dataset.dedup.model_dump(mode="json")},
        "sources": sources, "train": stats["train"], "val": stats["val"],
    }


def _publish(paths: dict[str, Path], work: Path, report: dict[str, Any]) -> None:
    """Move the outputs into place; the report (which marks them valid) goes last."""
    from impruver.data.store import store_files
    from impruver.files import atomic_write_text

    paths["report"].unlink(missing_ok=True)
    old = paths["data"] / f".old-tokenizer-{os.getpid()}"
    if paths["tokenizer"].exists():
        os.replace(paths["tokenizer"], old)
    os.replace(work / TOKENIZER_DIR, paths["tokenizer"])
    shutil.rmtree(old, ignore_errors=True)
    for split in ("train", "val"):
        paths[split].parent.mkdir(parents=True, exist_ok=True)
        made = {work / f"{split}.jsonl": paths[split]}  # the JSONL export and the token store beside it
        for part, target in store_files(paths[split]).items():
            source = store_files(work / f"{split}.jsonl")[part]
            if source.exists():
                made[source] = target
            else:  # records without a token store (preference pairs): no stale store of an earlier compose stays
                target.unlink(missing_ok=True)
        for source, target in made.items():
            if target.parent.resolve() == work.parent.resolve():
                os.replace(source, target)
            else:  # another filesystem, perhaps: copy beside the target, then rename
                tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
                shutil.copyfile(source, tmp)
                os.replace(tmp, target)
    atomic_write_text(paths["report"], json.dumps(report, indent=2, ensure_ascii=False) + "\n")


# -- showing -------------------------------------------------------------------------------------------------------


def show_report(report: dict[str, Any], *, reused: bool = False) -> None:
    """The report as rich tables: per-source counts, then token statistics."""
    from rich.table import Table

    title = "dataset composition" + (" (reused: nothing changed)" if reused else "")
    table = Table(title=title, title_justify="left")
    columns = ("source", "loaded", "converted", "invalid", "skipped", "too long", "duplicates", "kept", "train",
               "val")
    for column in columns:  # full headers even on a narrow or non-terminal console
        table.add_column(column, justify="left" if column == "source" else "right", min_width=len(column))
    for name, row in report.get("sources", {}).items():
        table.add_row(name, *map(str, (row["loaded"], row["converted"], _reasons(row["invalid"]),
                                       _reasons(row["skipped"]), row["too_long"] + row.get("no_trainable", 0),
                                       row["duplicates"], row["kept"], row["train_samples"], row["val_samples"])))
    console.print(table)
    for name, row in report.get("sources", {}).items():  # what was kept, but not whole: never silent
        notes = [f"{row['truncated']} samples truncated to fit ({row['dropped_messages']} earlier messages dropped)"
                 if row.get("truncated") else "",
                 f"{row['reasoning_dropped']} reasoning blocks the chat template leaves out"
                 if row.get("reasoning_dropped") else "",
                 f"{row['near_kept_by_exact_jaccard']} near-duplicate candidates kept (exact Jaccard below the "
                 "threshold)" if row.get("near_kept_by_exact_jaccard") else ""]
        if any(notes):
            console.print(f"{name}: " + "; ".join(n for n in notes if n))
    tokens = Table(title="tokens per sample", title_justify="left")
    for column in ("split", "samples", "tokens", "min", "mean", "p50", "p95", "max", "trained share"):
        tokens.add_column(column, justify="left" if column == "split" else "right", min_width=len(column))
    for split in ("train", "val"):
        s = report.get(split, {})
        tokens.add_row(split, *(str(s.get(k, "-")) for k in ("samples", "tokens", "min", "mean", "p50", "p95",
                                                             "max")), f"{s.get('trainable_fraction', 0):.1%}")
    console.print(tokens)


def _reasons(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ")"


def show_samples(result: ComposeResult, count: int) -> None:
    """Print ``count`` training samples as text, the trained tokens highlighted."""
    if result.report.get("records") in ("pair", "labelled"):
        from impruver.data.preference import show_pairs

        return show_pairs(result, count)
    from rich.text import Text

    from impruver.data.tokenizers import load_pretrained

    tokenizer = load_pretrained(result.tokenizer_dir)
    with result.train_path.open(encoding="utf-8") as handle:
        for n, line in zip(range(count), handle):
            sample = json.loads(line)
            text = Text()
            for trained, run in _runs(sample["input_ids"], sample["labels"]):
                text.append(tokenizer.decode(run), style="bold green" if trained else "dim")
            console.rule(f"sample {n + 1}: {len(sample['input_ids'])} tokens, "
                         f"{sum(1 for x in sample['labels'] if x != IGNORE_INDEX)} trained (green)")
            console.print(text)


def _runs(ids: list[int], labels: list[int]) -> Iterator[tuple[bool, list[int]]]:
    """Consecutive tokens grouped by whether they are trained on."""
    run: list[int] = []
    state = None
    for token, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if state is not None and trained != state:
            yield state, run
            run = []
        state = trained
        run.append(token)
    if run:
        yield bool(state), run


__all__ = ["ComposeResult", "run", "ensure_composed", "write_messages", "load_composed_tokenizer", "fingerprint"]
