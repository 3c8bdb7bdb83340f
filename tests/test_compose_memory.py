"""Memory that does not grow with a document: long raw texts tokenized in windows (the same ids as one encode),
near-dup hashing in windows (the same shingles and signatures), and a long document composed end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_helpers import SHARED, encoder_for, gpt2_tokenizer, mistral_tokenizer, needs_shared, qwen3_tokenizer
from impruver.data import dedup, render


def real_text(limit: int = 60_000) -> str:
    """English and Russian prose, lists and code-like lines from the shared files, as one document."""
    parts = []
    for name in ("alpaca/llamafactory_alpaca_en_demo.json", "alpaca_ru/rulm_tasks_saiga_mistral_7b_answers.jsonl"):
        path = SHARED / name
        rows = json.loads(path.read_text()) if path.suffix == ".json" else \
            [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            parts.append("\n".join(str(v) for v in row.values() if isinstance(v, str) and v.strip()))
            if sum(map(len, parts)) > limit:
                return "\n\n".join(parts)
    return "\n\n".join(parts)


@needs_shared
@pytest.mark.parametrize("name", ["gpt2", "qwen3", "mistral"])
def test_a_long_text_gets_exactly_the_ids_of_one_encode(name: str, tmp_path: Path, monkeypatch) -> None:
    tokenizer = {"gpt2": gpt2_tokenizer, "qwen3": lambda: qwen3_tokenizer(tmp_path / "q"),
                 "mistral": lambda: mistral_tokenizer(tmp_path / "m")}[name]()
    encoder = encoder_for(tokenizer, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    text = real_text()
    whole = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    monkeypatch.setattr(render, "TEXT_WINDOW", 3000)  # about 25 windows
    monkeypatch.setattr(render, "TEXT_MARGIN", 200)
    encoded_lengths = []
    original = encoder.encode_texts
    monkeypatch.setattr(encoder, "encode_texts", lambda texts: encoded_lengths.extend(map(len, texts))
                        or original(texts))
    assert encoder.text_ids(text).tolist() == whole
    if name != "mistral":  # byte-level BPEs split at whitespace: windows all the way, never the whole text
        assert len(encoded_lengths) > 20 and max(encoded_lengths) <= 3000


def _compose_long_document(tmp_path: Path, monkeypatch, chars: int, *, dedup: object = None,
                           add_bos: bool = False) -> tuple[object, list[int], object]:
    """One real text of ``chars`` characters as a raw-text source, composed in 128-token pieces with 4,000-character
    tokenizer windows: (the GPT-2 tokenizer, the whole text's ids + EOS, the compose result)."""
    from impruver.data import pipeline
    from impruver.plan import DatasetSpec, SourceSpec
    from test_train_support import tiny_plan

    text = real_text(chars)
    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    tok = gpt2_tokenizer()
    tok.save_pretrained(tmp_path / "gpt2")
    monkeypatch.setattr(render, "TEXT_WINDOW", 4000)
    plan = tiny_plan(tmp_path / "out", tokenizer_path=str(tmp_path / "gpt2"))
    source = SourceSpec(path=str(tmp_path / "doc.jsonl"), format="text", add_bos=add_bos)
    dataset = DatasetSpec(sources={"doc": source}, val_size=0, max_tokens=128, num_proc=1,
                          **({"dedup": dedup} if dedup is not None else {}))
    result = pipeline.compose(plan.model_copy(update={"dataset": dataset}))
    return tok, [*tok.backend_tokenizer.encode(text, add_special_tokens=False).ids, tok.eos_token_id], result


@needs_shared
def test_a_long_document_composes_to_the_chunks_of_its_whole_encoding(tmp_path: Path, monkeypatch) -> None:
    from impruver.plan import DedupSpec

    tok, ids, result = _compose_long_document(tmp_path, monkeypatch, 40_000, dedup=DedupSpec(near=True))
    reference = [ids[i:i + 128] for i in range(0, len(ids), 128)]
    reference = [piece for piece in reference if len(piece) > 1]
    lines = [json.loads(line) for line in result.train_path.read_text().splitlines()]
    assert [line["input_ids"] for line in lines] == reference and len(reference) > 50


@needs_shared
def test_word_hashing_in_windows_gives_the_same_shingles_and_signatures(monkeypatch) -> None:
    texts = [real_text(20_000), "короткий текст про мир", "a b", "", real_text(3_000)[::-1]]
    shingled = [dedup.shingles(t, 5) for t in texts]
    signed = dedup.signatures(texts, num_perm=64, shingle_size=5)
    monkeypatch.setattr(dedup, "_WINDOW_BYTES", 97)  # windows that fall inside words, cut at the next gap
    for text, expected in zip(texts, shingled):
        assert np.array_equal(dedup.shingles(text, 5), expected)
    assert np.array_equal(dedup.signatures(texts, num_perm=64, shingle_size=5, block=50), signed)
    for k, text in enumerate(texts):  # one by one (its own path) agrees with the batch
        assert np.array_equal(dedup.signature(text, num_perm=64, shingle_size=5), signed[k])


@pytest.mark.parametrize(("in_flight_bytes", "most_ahead"), [(8 << 20, 2 * 2 + 1), (1, 1 + 1)])
def test_the_worker_pool_reads_only_a_window_of_chunks_ahead(tmp_path: Path, monkeypatch, in_flight_bytes: int,
                                                             most_ahead: int) -> None:
    """The parent hands chunks to the workers as it reads them: never more than the window (2 per process, plus
    the chunk waiting for room) is read ahead of what came back, so the parent never holds the input; with a
    byte budget smaller than any chunk, one chunk at a time is in flight."""
    from impruver.data import pipeline
    from impruver.plan import DatasetSpec, DedupSpec, SourceSpec
    from test_train_support import make_tokenizer, tiny_plan

    make_tokenizer(tmp_path / "out" / "tok")
    chats = [{"messages": [{"role": "user", "content": f"question {i} one two three"},
                           {"role": "assistant", "content": f"answer {i} four five six"}]} for i in range(120)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    monkeypatch.setattr(pipeline, "CHUNK", 4)  # 30 chunks
    monkeypatch.setattr(pipeline, "IN_FLIGHT_BYTES", in_flight_bytes)
    read, ahead = [0], []
    tasks = pipeline._tasks

    def counted(*args):
        for task in tasks(*args):
            read[0] += 1
            yield task

    add = pipeline._Collector.add

    def collected(self, shard, result):
        ahead.append(read[0] - len(ahead))  # chunks read but not yet back
        return add(self, shard, result)

    monkeypatch.setattr(pipeline, "_tasks", counted)
    monkeypatch.setattr(pipeline._Collector, "add", collected)
    plan = tiny_plan(tmp_path / "out")
    dataset = DatasetSpec(sources={"c": SourceSpec(path=str(tmp_path / "c.jsonl"), format="openai")},
                          val_size=2, num_proc=2, dedup=DedupSpec(near=False), max_tokens=128)
    result = pipeline.compose(plan.model_copy(update={"dataset": dataset}))
    assert result.report["train"]["samples"] == 118 and len(ahead) == 30
    assert max(ahead[pipeline.POOL_MIN_CHUNKS:]) == most_ahead, ahead  # after the first chunks, read to choose


def test_whitespace_is_normalized_as_str_split_does() -> None:
    spaces = "".join(chr(c) for c in range(0x3000 + 1) if chr(c).isspace())
    text = f"{spaces}A b{spaces}C\td\u00a0e\x1cf  {spaces}"
    assert dedup.normalize(text) == " ".join(text.lower().split()) == "a b c d e f"


def _chunks_reference(ids: list[int], bos: int | None, eos: int | None, max_tokens: int) -> list[list[int]]:
    """Raw text cut as impruver cut it with Python lists: EOS closing the document, max_tokens pieces (BOS
    first in each when asked), pieces of one token left out."""
    ids = [*ids, *([] if eos is None else [eos])]
    room = max_tokens - (bos is not None)
    pieces = [([bos] if bos is not None else []) + ids[start:start + room] for start in range(0, len(ids), room)]
    return [piece for piece in pieces if len(piece) > 1]


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 15, 16, 17, 100])
def test_raw_text_pieces_are_the_list_cut_as_int32_views(add_bos: bool, length: int) -> None:
    encoder = render.Encoder.__new__(render.Encoder)  # only its ids: no tokenizer needed
    ids = list(range(1000, 1000 + length))
    for bos, eos in ((1, 2), (None, 2), (1, None), (None, None)):
        encoder.bos_id, encoder.eos_id = bos, eos
        options = render.SourceOptions(add_bos=add_bos, max_tokens=8)
        expected = _chunks_reference(ids, bos if add_bos else None, eos, 8)
        for given in (ids, np.array(ids, dtype=np.int32)):  # a short text's list, a long one's array
            got = encoder._chunks(given, options)
            if not expected:
                assert isinstance(got, render.RecordError)
                continue
            assert [s.input_ids.tolist() for s in got] == expected
            assert all(s.input_ids.dtype == np.int32 and s.labels is s.input_ids and s.trainable == len(s.input_ids)
                       for s in got)


@needs_shared
def test_a_long_texts_ids_cost_bytes_per_token_not_python_ints(monkeypatch) -> None:
    """Traced Python memory while a 350k-character text (~140k tokens) is encoded, in small windows (so the
    windows' own encodings are small next to the document): int32 arrays, about 12 bytes a token at the peak
    (the windows' arrays, their join, the EOS added); the lists it was held in before cost about 52."""
    import random
    import tracemalloc

    rng = random.Random(1)
    words = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "ru", "ta") for b in ("n", "ra", "tel", "mo", "ski", "bar")]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(5000))
    encoder = encoder_for(gpt2_tokenizer(), "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    monkeypatch.setattr(render, "TEXT_WINDOW", 8192)
    monkeypatch.setattr(render, "TEXT_MARGIN", 512)
    monkeypatch.setattr(render, "TEXT_CHECK", 32)
    tracemalloc.start()
    try:
        samples = encoder.encode([{"text": text}], render.SourceOptions(max_tokens=2048))[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    tokens = sum(len(s.input_ids) for s in samples)
    whole = [*encoder.backend.encode(text, add_special_tokens=False).ids, encoder.eos_id]
    assert np.concatenate([s.input_ids for s in samples]).tolist() == whole and tokens > 100_000
    assert peak / tokens < 20, f"{peak / tokens:.1f} bytes a token"


@needs_shared
def test_a_long_documents_lines_and_store_hold_the_same_ids_as_json_of_lists(tmp_path: Path, monkeypatch) -> None:
    """Raw-text samples serialized from int32 arrays: the JSONL lines are byte for byte what json.dumps writes for
    the same ids as lists, and the token store holds the same ids (a BOS before each piece here)."""
    from impruver.data.store import open_store

    tok, ids, result = _compose_long_document(tmp_path, monkeypatch, 30_000, add_bos=True)
    pieces = _chunks_reference(ids, tok.bos_token_id, None, 128)
    lines = result.train_path.read_bytes().splitlines(keepends=True)
    assert lines == [(json.dumps({"input_ids": p, "labels": p, "attention_mask": [1] * len(p)},
                                 separators=(",", ":")) + "\n").encode() for p in pieces] and len(pieces) > 40
    store_ids, store_labels, offsets = open_store(result.train_path)
    assert store_ids.tolist() == store_labels.tolist() == [t for p in pieces for t in p]
    assert offsets.tolist() == np.cumsum([0, *map(len, pieces)]).tolist()
