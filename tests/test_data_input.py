"""Input text as people have it: invalid UTF-8, byte-order marks and broken JSON are per-record matters named by
file:line (and column), skippable with dataset.on_error=skip; nothing ends in a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from impruver.data import convert
from impruver.data.sources import iter_items
from impruver.errors import DataError


def record(i: int) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": f"вопрос {i}"},
                                    {"role": "assistant", "content": f"ответ {i}"}]},
                      ensure_ascii=False).encode("utf-8") + b"\n"


def read(path: Path, on_error: str) -> tuple[list[tuple[str, dict]], dict]:
    spec = SimpleNamespace(path=str(path), split="train", limit=None, fraction=None)
    source = {"name": "s", "format": "openai", "options": {}, "mapping": {}, "system": None}
    counts = convert.new_counts()
    found = list(convert.convert_items(iter_items(spec, name="s", seed=0), source, on_error, counts))
    return found, counts


def test_invalid_utf8_is_one_bad_record_with_file_line_and_column(tmp_path: Path) -> None:
    bad = record(1).replace("ответ".encode(), b"\xff\xfe" + "твет".encode())  # two bytes that are not UTF-8
    path = tmp_path / "chats.jsonl"
    path.write_bytes(record(0) + bad + record(2))
    with pytest.raises(DataError) as raised:
        read(path, "raise")
    column = bad.index(b"\xff") + 1
    assert str(raised.value).startswith(f"{path}:2: byte 0xff at column {column} is not UTF-8")
    assert "dataset.on_error=skip" in str(raised.value)
    found, counts = read(path, "skip")
    assert [where for where, _ in found] == [f"{path}:1", f"{path}:3"]
    assert counts["invalid"] == {"invalid_utf8": 1} and counts["loaded"] == 3


def test_a_byte_order_mark_is_accepted_and_the_first_record_kept(tmp_path: Path) -> None:
    for name in ("chats.jsonl", "chats.json"):
        path = tmp_path / name
        body = record(0) + record(1) if name.endswith("l") else \
            b"[" + record(0).strip() + b", " + record(1).strip() + b"]"
        path.write_bytes(b"\xef\xbb\xbf" + body)
        for on_error in ("raise", "skip"):
            found, counts = read(path, on_error)
            assert [c["messages"][0]["content"] for _, c in found] == ["вопрос 0", "вопрос 1"], (name, on_error)
            assert counts["invalid"] == {}


def test_csv_and_text_files_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\xef\xbb\xbfFirst paragraph.\n\nSecond one.\n")
    items = list(iter_items(SimpleNamespace(path=str(path), split="train", limit=None, fraction=None),
                            name="t", seed=0))
    assert [payload["text"] for _, payload in items] == ["First paragraph.", "Second one."]
    path = tmp_path / "rows.csv"
    path.write_bytes(b"\xef\xbb\xbfinstruction,output\nhi,hello\n")
    items = list(iter_items(SimpleNamespace(path=str(path), split="train", limit=None, fraction=None),
                            name="c", seed=0))
    assert items[0][1] == {"instruction": "hi", "output": "hello"}


def test_broken_json_reports_its_real_column(tmp_path: Path) -> None:
    line = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},]}\n'
    path = tmp_path / "chats.jsonl"
    path.write_bytes(record(0) + line)
    with pytest.raises(DataError) as raised:
        read(path, "raise")
    column = line.index(b",]") + 2  # json's column of the "]" where a value was expected (1-based)
    assert f"{path}:2: not valid JSON" in str(raised.value)
    assert f"column {column})" in str(raised.value), str(raised.value)
    cut = '{"messages": [{"role": "user", "content": "привет"'  # a line cut short (a copy that stopped)
    path.write_bytes(record(0) + cut.encode() + b"\r\n")
    with pytest.raises(DataError) as raised:
        read(path, "raise")
    assert f"chats.jsonl:2: not valid JSON (Expecting ',' delimiter at column {len(cut) + 1})" in str(raised.value)


def test_a_json_file_with_invalid_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "chats.json"
    path.write_bytes(b'[\n{"messages": []},\n{"a": "\xc3("}\n]')
    with pytest.raises(DataError, match=r"chats.json:3: byte 0xc3 at column 8 is not UTF-8"):
        read(path, "raise")


def test_a_json_array_is_read_record_by_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory holds a window, not the file: a 5 MB array read with limit=100 through a 64 K window allocates well
    under 1 MB, and the records equal json.loads's whatever the window (1 KB: records and numbers straddle it)."""
    import tracemalloc

    from impruver.data import sources

    records = [{"messages": [{"role": "user", "content": f"вопрос {i} " + "x" * 300},
                             {"role": "assistant", "content": f"ответ {i}"}], "score": i * 1.5, "n": 10 ** 12 + i}
               for i in range(12000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    assert path.stat().st_size > 5_000_000

    def items(limit):
        return iter_items(SimpleNamespace(path=str(path), split="train", limit=limit, fraction=None, subset=None),
                          name="s", seed=0)

    monkeypatch.setattr(sources, "_ARRAY_CHUNK", 1 << 16)  # a 64 K-character window
    tracemalloc.start()
    first = [record for _, record in items(100)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert first == records[:100] and peak < 1_000_000, peak
    monkeypatch.setattr(sources, "_ARRAY_CHUNK", 1024)
    assert [record for _, record in items(None)] == records


def test_a_broken_json_array_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "chats.json"
    path.write_text('[\n {"a": 1},\n {"a": 2}\n {"a": 3}\n]')
    with pytest.raises(DataError, match=r"chats.json:4: not valid JSON \(expected ',' or '\]' after record 1\)"):
        list(iter_items(SimpleNamespace(path=str(path), split="train", limit=None, fraction=None, subset=None),
                        name="s", seed=0))
    path.write_text('[\n {"a": 1},\n {"a": tru}\n]')
    with pytest.raises(DataError, match=r"chats.json:3: not valid JSON \(Expecting value, column 8\)"):
        list(iter_items(SimpleNamespace(path=str(path), split="train", limit=None, fraction=None, subset=None),
                        name="s", seed=0))
    path.write_text('[\n {"a": 1},\n {"a": 2}')
    with pytest.raises(DataError, match="cut short after record 1"):
        list(iter_items(SimpleNamespace(path=str(path), split="train", limit=None, fraction=None, subset=None),
                        name="s", seed=0))


def test_chunks_are_bounded_by_bytes_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from impruver.data import pipeline

    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"".join(json.dumps({"text": f"{i} " + "w" * 290}).encode() + b"\n" for i in range(10)))
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 1000)  # each line is ~300 bytes: 4 lines reach it
    plan = SimpleNamespace(sources={"s": SimpleNamespace(path=str(path), split="train", limit=None, fraction=None,
                                                         subset=None)}, dataset=SimpleNamespace(seed=0))
    sizes = [len(chunk) for (_, _, chunk, _), _size in pipeline._tasks(plan, tmp_path)]
    assert sizes == [4, 4, 2]


def test_the_bpe_sample_is_bounded_and_takes_the_sources_in_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from impruver.data import pipeline

    def source(name: str, count: int) -> SimpleNamespace:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{name}{i} " + "z" * 95}) + "\n" for i in range(count)))
        return SimpleNamespace(path=str(path), split="train", limit=None, fraction=None, subset=None, format="text",
                               options={}, mapping={}, system=None, max_tokens=None, only_target_loss=True,
                               add_bos=False, add_eos=False)

    plan = SimpleNamespace(sources={"big": source("big", 1000), "small": source("small", 3)}, max_tokens=64,
                           dataset=SimpleNamespace(seed=0, on_error="raise", length_policy="drop",
                                                   dedup=SimpleNamespace(threshold=0.85, num_perm=128, near=True,
                                                                         shingle_size=5)))
    monkeypatch.setattr(pipeline, "BPE_SAMPLE_CHARS", 1000)
    texts = list(pipeline._training_texts(plan))
    assert [t.split()[0] for t in texts] == ["big0", "small0", "big1", "small1", "big2", "small2", "big3", "big4",
                                             "big5", "big6"]  # 10 texts of 100 characters: the budget


@pytest.mark.parametrize("good_lines", [0, 2])
def test_data_file_with_a_broken_first_line_names_it_and_leaves_nothing(tmp_path: Path, good_lines: int) -> None:
    """`impruver data=FILE` (format auto) on a file whose first line is broken JSON: exit 2, no traceback, the
    error names FILE:1 and the JSON error (never "no known format fits records with fields none"), and nothing is
    left: no run folder, no record of a last run, no outputs/ folder."""
    import os
    import subprocess
    import sys

    broken = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant" "content": "yo"}]}\n'
    (tmp_path / "chats.jsonl").write_bytes(broken + b"".join(record(i) for i in range(good_lines)))
    done = subprocess.run([sys.executable, "-m", "impruver", "data=chats.jsonl"], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    err = " ".join(done.stderr.split())
    assert done.returncode == 2 and "Traceback" not in err, err
    assert "chats.jsonl:1: not valid JSON (Expecting ',' delimiter at column 71)" in err, err
    assert "no known format" not in err and ("could read none" in err) == (good_lines == 0)
    assert not (tmp_path / "outputs").exists(), "a run that never ran is not the last run, and leaves no folder"


def test_a_preference_compose_with_a_broken_first_line_leaves_nothing(tmp_path: Path) -> None:
    """The pair compose chooses its formats before making any folder, as SFT's does (one work-folder helper)."""
    import os
    import subprocess
    import sys

    (tmp_path / "pairs.jsonl").write_text('{"prompt": "hi", "chosen": "a"\n', encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "impruver", "compose", "objective=dpo", "data=pairs.jsonl",
                           "output_dir=run"], cwd=tmp_path, text=True, capture_output=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    err = " ".join(done.stderr.split())
    assert done.returncode == 2 and "Traceback" not in err, err
    assert "pairs.jsonl:1: not valid JSON" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"], "a failed compose leaves no folder"
