"""Hub sources stream: `streaming: true`, and `split: train[:N]` reads only what it needs. There is no Hub here, so
local dataset folders go through the very code path a Hub id takes (`datasets.load_dataset`, then skip / take)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from impruver.data import sources
from impruver.errors import DataError


def spec(path: Path, **fields) -> SimpleNamespace:
    return SimpleNamespace(**{"path": str(path), "split": "train", "subset": None, "revision": None, "limit": None,
                              "fraction": None, "trust_remote_code": False, "streaming": False, **fields})


def chats(first: int, count: int) -> list[dict]:
    return [{"id": i, "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(first, first + count)]


def records(source: SimpleNamespace) -> list[dict]:
    return [record for _, record in sources.dataset_items(source, "dataset.sources.s.path")]


def arrow_files(cache: Path) -> list[Path]:
    return list(cache.rglob("*.arrow")) if cache.exists() else []


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """datasets' cache in the test's folder (a non-streamed load writes Arrow files there)."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture
def parquet_folder(tmp_path: Path) -> Path:
    """A dataset folder of two parquet files (60 + 40 rows), as a Hub dataset repository holds them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "ds" / "data"
    folder.mkdir(parents=True)
    for name, rows in (("train-00000-of-00002.parquet", chats(0, 60)), ("train-00001-of-00002.parquet",
                                                                         chats(60, 40))):
        pq.write_table(pa.Table.from_pylist(rows), folder / name, row_group_size=16)
    return folder.parent


def test_streamed_source_yields_the_same_records_as_the_prepared_one(parquet_folder: Path, hf_home: Path) -> None:
    streamed = records(spec(parquet_folder, streaming=True))
    window = records(spec(parquet_folder, split="train[55:70]"))  # absolute bounds stream, across the two files
    assert not arrow_files(hf_home)  # streamed: nothing prepared
    prepared = records(spec(parquet_folder))
    assert arrow_files(hf_home)  # prepared as Arrow files in datasets' cache
    assert len(streamed) == 100 and streamed == prepared
    assert [r["id"] for r in streamed] == list(range(100))
    assert window == prepared[55:70]


def test_train_head_streams_and_stops_early(tmp_path: Path, hf_home: Path) -> None:
    """train[:N] reads the first file only: the second is broken, so reading it all fails, streaming N does not."""
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats(0, 50)), encoding="utf-8")
    (folder / "part-1.jsonl").write_text('{"id": 50, "messages": [\n' + "not json\n" * 1000, encoding="utf-8")
    head = records(spec(folder, split="train[:20]"))
    assert [r["id"] for r in head] == list(range(20))
    assert not arrow_files(hf_home)  # nothing prepared
    assert [r["id"] for r in records(spec(folder, split="train[5:30]", streaming=True))] == list(range(5, 30))
    with pytest.raises(Exception):  # noqa: B017 (datasets' own error: the whole split is read and prepared)
        records(spec(folder))


def test_streaming_cannot_take_a_share_of_an_unknown_total(parquet_folder: Path) -> None:
    for split in ("train[:10%]", "train[-10:]"):
        with pytest.raises(DataError, match="streaming: false"):
            records(spec(parquet_folder, split=split, streaming=True))


def test_a_hub_source_streams_through_iter_items(parquet_folder: Path, hf_home: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole source path of a Hub id (offline check, loading, limit), with the folder standing in for the Hub."""
    import impruver.hub

    monkeypatch.setattr(sources, "resolve_path", lambda path, key: None)  # "not a local path": a Hub id
    monkeypatch.setattr(impruver.hub, "offline", lambda: False)
    source = spec(parquet_folder, streaming=True, limit=7, format="openai", subset=None)
    items = list(sources.iter_items(source, name="s", seed=0))
    assert [record["id"] for _, record in items] == list(range(7))
    assert items[0][0] == f"{parquet_folder}[train][0]"
    assert not arrow_files(hf_home)


def test_the_plan_takes_streaming_on_a_source() -> None:
    from impruver.plan import SourceSpec

    assert SourceSpec(path="org/name", format="openai", streaming=True).streaming
    assert not SourceSpec(path="org/name", format="openai").streaming
