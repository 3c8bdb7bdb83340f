"""Where records come from: local files and folders, files shipped in packages (``pkg://``), and the Hub.

Records are streamed: :func:`iter_items` yields one ``(where, payload)`` at a time, where ``where`` names the
record for error messages (``file:line`` for local files) and ``payload`` is an unparsed JSON line as bytes
(decoded and parsed later, in a worker process, so that a bad byte is one bad record) or a record dict.
Slicing (``train[:1000]``, ``train[10%:]``), ``limit`` and ``fraction`` are applied here, before any conversion.

JSON lines, parquet, csv, text files and ``.json`` arrays are read incrementally (memory holds a window and a
record, and ``limit`` stops the reading early); a ``.json`` object is parsed whole; Hub datasets are streamed
(``streaming: true``, or a split with absolute bounds such as ``train[:1000]``: only what is read is fetched) or
else downloaded and mapped from disk as Arrow tables.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import xxhash

from impruver.errors import DataError

SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".txt")
SPLIT = re.compile(r"^(?P<name>[\w.-]+)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")

Item = tuple[str, Any]  # (where, JSON line or record)


def resolve_path(path: str, key: str) -> Path | None:
    """A local file or folder for ``path`` (``pkg://`` resolved); None for a Hub id.

    Raises:
        DataError: a local-looking path that does not exist.
    """
    from impruver.hub import is_local

    if path.startswith("pkg://"):
        package, _, rel = path[len("pkg://"):].partition("/")
        try:
            from importlib.resources import files

            target = Path(str(files(package).joinpath(rel)))
        except ModuleNotFoundError:
            raise DataError(f"{key}: no installed package '{package}' for {path}") from None
        if not target.exists():
            raise DataError(f"{key}: {path} does not exist (looked at {target})")
        return target
    local = Path(path).expanduser()
    if local.exists():
        return local
    if is_local(path):
        raise DataError(f"{key}: no file or folder at {path} (relative paths start at {Path.cwd()})")
    return None


def local_files(root: Path, key: str) -> list[Path]:
    """The data files of a file or folder, sorted."""
    if root.is_file():
        return [root]
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not found:
        raise DataError(f"{key}: the folder {root} holds no {', '.join(SUFFIXES)} files")
    return found


def parse_split(split: str, key: str) -> tuple[str, str | None, str | None]:
    match = SPLIT.match(split.replace(" ", ""))
    if not match:
        raise DataError(f"{key}: cannot read split '{split}'; write e.g. train, train[:1000] or train[10%:50%]")
    return match["name"], match["start"], match["stop"]


def dataset_info_entry(spec: Any, key: str) -> tuple[Path, dict[str, Any]] | None:
    """LLaMA-Factory's ``dataset_info.json`` as a source (``path: .../dataset_info.json``, ``subset: NAME``): the
    file and the entry of the named dataset; None for any other path.

    Raises:
        DataError: no dataset named, or a name the file does not list (with the closest ones).
    """
    root = resolve_path(spec.path, key)
    if root is None or not root.is_file() or not root.name.endswith("dataset_info.json"):
        return None
    info = json.loads(_read_text(root, key))
    if not spec.subset or spec.subset not in info:
        from impruver.errors import choices_hint

        wanted = f"no dataset '{spec.subset}' in it" if spec.subset else "name one of its datasets with subset: NAME"
        raise DataError(f"{key}: {root} is LLaMA-Factory's dataset list; {wanted} "
                        f"({choices_hint(spec.subset or '', sorted(info))})")
    return root, info[spec.subset]


def _dataset_info_items(spec: Any, root: Path, entry: dict[str, Any], key: str) -> Iterator[Item]:
    """The records of one dataset_info.json entry: its file or folder beside the list, or its Hub dataset."""
    if "file_name" in entry:
        yield from _local_items(local_files(root.parent / entry["file_name"], key), key)
    elif "hf_hub_url" in entry:
        from types import SimpleNamespace

        hub = SimpleNamespace(path=entry["hf_hub_url"], subset=entry.get("subset"),
                              split=entry.get("split", spec.split), revision=entry.get("revision", spec.revision),
                              trust_remote_code=spec.trust_remote_code)
        yield from _hub_items(hub, key)
    else:
        raise DataError(f"{key}: the entry '{spec.subset}' of {root} has neither file_name nor hf_hub_url "
                        f"(it has {', '.join(sorted(entry))}); impruver reads those two")


def iter_items(spec: Any, *, name: str, seed: int) -> Iterator[Item]:
    """Every record of one source, sliced, limited and sampled as it says.

    A format may carry an ``assemble`` step (``func.assemble(items) -> items``) for records that only make sense
    together, such as OpenAssistant's flat message export (messages linked by parent ids, assembled into trees);
    it runs before ``limit`` and ``fraction``, which then count what it yields.
    """
    return _assembled(_source_items(spec, name=name, seed=seed), spec, name, seed)


def _assembled(items: Iterator[Item], spec: Any, name: str, seed: int) -> Iterator[Item]:
    from impruver import registry

    fmt = getattr(spec, "format", None)
    assemble = getattr(registry.lookup("formats", fmt), "assemble", None) if fmt else None
    if assemble is None:
        return _sampled(items, spec, name, seed)
    return _sampled(assemble(items), spec, name, seed)


def _source_items(spec: Any, *, name: str, seed: int) -> Iterator[Item]:
    """A source's records, sliced (not yet limited or sampled)."""
    key = f"dataset.sources.{name}.path"
    listed = dataset_info_entry(spec, key)
    if listed is not None:  # LLaMA-Factory's num_samples: the first records, unless the source sets a limit
        items = _dataset_info_items(spec, *listed, key)
        if spec.limit is None and listed[1].get("num_samples"):
            items = _sliced(items, 0, int(listed[1]["num_samples"]))
        return items
    root = resolve_path(spec.path, key)
    split_name, start, stop = parse_split(spec.split, f"dataset.sources.{name}.split")
    if root is None:
        items = _hub_items(spec, key)  # datasets slices `train[:1000]` itself
    else:
        files = local_files(root, key)
        items = _local_items(files, key)
    if root is not None and (start or stop):
        total = _count(spec, root, key) if any(v and v.endswith("%") for v in (start, stop)) else None
        items = _sliced(items, _bound(start, total, 0), _bound(stop, total, None))
    return items


def _bound(value: str | None, total: int | None, default: int | None) -> int | None:
    if value is None:
        return default
    if value.endswith("%"):
        number = round(int(value[:-1]) * (total or 0) / 100)
        return number if number >= 0 else (total or 0) + number
    number = int(value)
    return number if number >= 0 or total is None else total + number


def _sliced(items: Iterator[Item], start: int | None, stop: int | None) -> Iterator[Item]:
    for i, item in enumerate(items):
        if stop is not None and i >= stop:
            return
        if i >= (start or 0):
            yield item


def _sampled(items: Iterator[Item], spec: Any, name: str, seed: int) -> Iterator[Item]:
    kept = 0
    threshold = None if spec.fraction is None else int(spec.fraction * 2**64)
    for i, item in enumerate(items):
        if spec.limit is not None and kept >= spec.limit:
            return
        # A record's fate under `fraction` depends on the seed, the source and its index only: reproducible.
        if threshold is not None and xxhash.xxh64_intdigest(f"{seed}:{name}:{i}".encode()) >= threshold:
            continue
        kept += 1
        yield item


def _count(spec: Any, root: Path | None, key: str) -> int:
    items = _hub_items(spec, key) if root is None else _local_items(local_files(root, key), key)
    return sum(1 for _ in items)


def _local_items(files: list[Path], key: str) -> Iterator[Item]:
    for path in files:
        yielded = 0
        for item in _file_items(path, key):
            yielded += 1
            yield item
        if not yielded:
            raise DataError(f"{key}: {path} is empty (no records)")


def _file_items(path: Path, key: str) -> Iterator[Item]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_items(path)
    elif suffix == ".json":
        yield from _json_items(path, key)
    elif suffix == ".parquet":
        yield from _parquet_items(path)
    elif suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as handle:
            for i, row in enumerate(csv.DictReader(handle), 2):
                yield f"{path}:{i}", row
    elif suffix == ".txt":
        yield from _text_items(path)
    else:
        raise DataError(f"{key}: cannot read {path}: impruver reads {', '.join(SUFFIXES)}")


def _jsonl_items(path: Path) -> Iterator[Item]:
    """Each non-blank line, as bytes: decoding (and so an invalid UTF-8 byte) is a per-record matter, reported
    with its file:line by the converter and skippable like any bad record. A UTF-8 byte-order mark (written by
    some Windows editors) is dropped from the first line."""
    with path.open("rb") as handle:
        for lineno, line in enumerate(handle, 1):
            if lineno == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            if line.strip():
                yield f"{path}:{lineno}", line


_ARRAY_CHUNK = 1 << 20  # characters read at a time from a JSON array


def _json_items(path: Path, key: str) -> Iterator[Item]:
    """The records of a ``.json`` file: a top-level array is read incrementally (memory holds one chunk and one
    record, and ``limit`` stops the reading early); an object (one record, or ``{"data": [records]}``) or JSON lines
    under a .json name are read whole."""
    with path.open("rb") as handle:
        head = handle.read(4096).decode("utf-8-sig", errors="ignore").lstrip()
    if head.startswith("["):
        yield from _array_items(path, key)
        return
    text = _read_text(path, key)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{") and "\n{" in text:  # JSON lines under a .json name
            yield from _jsonl_items(path)
            return
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    if isinstance(data, dict):  # one record, or {"data": [records]}
        only = next(iter(data.values())) if len(data) == 1 else None
        data = only if isinstance(only, list) and all(isinstance(r, dict) for r in only) else [data]
    if not isinstance(data, list):
        raise DataError(f"{key}: {path} holds {type(data).__name__}; impruver reads a list of records")
    for i, record in enumerate(data):
        yield f"{path}[{i}]", record


def _array_items(path: Path, key: str) -> Iterator[Item]:
    """The elements of a top-level JSON array, parsed one at a time from a sliding window of the text."""
    decoder = json.JSONDecoder()
    reader = codecs.getincrementaldecoder("utf-8-sig")()
    buffer, position, index, eof = "", 0, 0, False
    consumed_lines, column_base = 1, 0  # the line the window starts on, and the characters of it before the window

    with path.open("rb") as handle:

        def more() -> bool:
            nonlocal buffer, eof, position, consumed_lines, column_base
            if eof:
                return False
            data = handle.read(_ARRAY_CHUNK)
            try:
                text = reader.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                start = max(exc.start, 0)
                line = consumed_lines + buffer.count("\n") + data.count(b"\n", 0, start)
                column = start - data.rfind(b"\n", 0, start)  # in bytes, from the chunk's last line start
                raise DataError(f"{path}:{line}: byte 0x{data[start]:02x} at column {column} is not UTF-8 "
                                f"({key}); save the file as UTF-8") from None
            eof = not data
            newline = buffer.rfind("\n", 0, position)  # drop what is parsed; keep lines and columns right
            consumed_lines += buffer.count("\n", 0, position)
            column_base = position - newline - 1 if newline >= 0 else column_base + position
            buffer, position = buffer[position:] + text, 0
            return True

        def column(at: int) -> int:  # 1-based column of the window's character ``at``
            newline = buffer.rfind("\n", 0, at)
            return at - newline if newline >= 0 else column_base + at + 1

        def skip(chars: str) -> str:  # the next character that is not in ``chars`` ("" at the end)
            nonlocal position
            while True:
                while position < len(buffer) and buffer[position] in chars:
                    position += 1
                if position < len(buffer) or not more():
                    return buffer[position:position + 1]

        if skip(" \t\r\n") != "[":
            raise DataError(f"{key}: {path} does not start with a JSON array")
        position += 1
        expect_value = True
        while True:
            mark = skip(" \t\r\n")
            if mark == "]":
                return
            if mark == "," and not expect_value:
                position += 1
                expect_value = True
                continue
            if not mark or not expect_value:
                line = consumed_lines + buffer.count("\n", 0, position)
                raise DataError(f"{path}:{line}: not valid JSON (expected ',' or ']' after record {index - 1})"
                                if mark else f"{path}: the JSON array is cut short after record {index - 1}")
            while True:
                try:
                    record, end = decoder.raw_decode(buffer, position)
                except json.JSONDecodeError as exc:
                    if more():  # perhaps only cut by the window: read on and try again
                        continue
                    line = consumed_lines + buffer.count("\n", 0, exc.pos)
                    raise DataError(f"{path}:{line}: not valid JSON ({exc.msg}, column {column(exc.pos)})") from None
                if end == len(buffer) and more():  # a number may go on in the next chunk
                    continue
                break
            position = end
            expect_value = False
            yield f"{path}[{index}]", record
            index += 1


def _read_text(path: Path, key: str) -> str:
    """A whole file as text (a UTF-8 byte-order mark accepted); invalid UTF-8 named with its line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, column = _line_column(data, exc.start)
        raise DataError(f"{path}:{line}: byte 0x{data[exc.start]:02x} at column {column} is not UTF-8 ({key}); "
                        "save the file as UTF-8") from None


def _line_column(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column (in bytes) of ``offset`` in ``data``."""
    start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - start + 1


def _parquet_items(path: Path) -> Iterator[Item]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"{path}[row {index}]", record
            index += 1


def _text_items(path: Path) -> Iterator[Item]:
    """Paragraphs (separated by blank lines) of a text file, each a ``{"text": ...}`` record."""
    lines: list[str] = []
    first = 1
    with path.open(encoding="utf-8-sig") as handle:
        for lineno, line in enumerate(handle, 1):
            if line.strip():
                if not lines:
                    first = lineno
                lines.append(line)
            elif lines:
                yield f"{path}:{first}", {"text": "".join(lines).strip()}
                lines = []
    if lines:
        yield f"{path}:{first}", {"text": "".join(lines).strip()}


def _hub_items(spec: Any, key: str) -> Iterator[Item]:
    from impruver.hub import hub_unreachable, offline

    local_hint = (" Or point the source at local files of the same records: "
                  f"{key}=/path/to/file.jsonl (json, jsonl, parquet, csv or txt; a folder works too).")
    if offline():
        raise DataError(str(hub_unreachable(spec.path, "dataset", key)) + local_hint)
    try:
        yield from dataset_items(spec, key)
    except (ConnectionError, OSError) as exc:
        raise DataError(str(hub_unreachable(spec.path, "dataset", key, exc)) + local_hint) from None


def dataset_items(spec: Any, key: str) -> Iterator[Item]:
    """The records of a ``datasets.load_dataset`` source (a Hub id, or anything else it loads).

    Streamed (nothing downloaded or prepared beyond what is read) when the source says ``streaming: true`` or
    its split takes absolute bounds (``train[:1000]``, ``train[500:1500]``): the records come from
    ``load_dataset(..., streaming=True)`` and stop at the split's end, so only the first files and rows are read.
    Otherwise the split is downloaded, prepared as Arrow and mapped from disk (``train[10%:]`` and
    ``train[-100:]`` need the total, so they cannot stream).

    Raises:
        DataError: a percentage or negative bound on a streamed source, or a split the dataset does not have.
    """
    import datasets

    name, start, stop = parse_split(spec.split, key)
    absolute = not any(v and (v.endswith("%") or v.startswith("-")) for v in (start, stop))
    streaming = bool(getattr(spec, "streaming", False)) or (absolute and (start or stop) is not None)
    if streaming and not absolute:
        raise DataError(f"{key}: split '{spec.split}' needs the split's size, which a streamed source does not know "
                        "before reading it; give absolute bounds (train[:1000], train[500:1500]) or streaming: false")
    kwargs: dict[str, Any] = {"split": name if streaming else spec.split, "revision": spec.revision}
    if streaming:
        kwargs["streaming"] = True
    if spec.trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        data = datasets.load_dataset(spec.path, spec.subset, **kwargs)
    except ValueError as exc:
        raise DataError(f"{key}: cannot load {spec.path} split {spec.split!r} ({name}): {exc}") from None
    # The bounds of a streamed split, taken from the records as they come: datasets' own take() reads the next
    # file ahead (measured with datasets 5.2), a plain iteration does not.
    rows = islice(data, int(start or 0), None if stop is None else int(stop)) if streaming else data
    for i, record in enumerate(rows):
        yield f"{spec.path}[{spec.split}][{i}]", record


def fingerprint_source(spec: Any, name: str) -> dict[str, Any]:
    """What identifies a source's content: local files by size and content hash, Hub ids by revision."""
    key = f"dataset.sources.{name}.path"
    root = resolve_path(spec.path, key)
    if root is None:
        return {"hub": spec.path, "revision": spec.revision, "subset": spec.subset}
    files = local_files(root, key)
    listed = dataset_info_entry(spec, key)
    if listed is not None:
        if "file_name" not in listed[1]:
            return {"dataset_info": listed[1]}
        files = [root, *local_files(root.parent / listed[1]["file_name"], key)]
    digests = []
    for path in files:
        hasher = xxhash.xxh64()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
        digests.append([path.name, path.stat().st_size, hasher.hexdigest()])
    return {"files": digests}
