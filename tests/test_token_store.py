"""The composed token store: the same samples as the JSONL export, the same training, one shared copy in memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train_support import make_tokenizer, tiny_plan, use_files  # noqa: F401  (fixture)

from impruver.data import pipeline
from impruver.data.store import StoreWriter, open_store, store_files
from impruver.plan import DatasetSpec, DedupSpec, SourceSpec
from impruver.train import data as train_data

WORDS = "one two three four five six seven eight nine ten hello world how are you fine thank".split()


def chats(n: int) -> list[dict]:
    """Distinct two- and four-turn chats (so some samples are long and some repeat a weight)."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 5 + k * (i % 7 + 1)) % len(WORDS)] for k in range(6 + i % 9)]
        messages = [{"role": "user", "content": f"{i} " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words)) + f" {i}"}]
        if i % 3 == 0:
            messages += [{"role": "user", "content": "and " + words[0]}, {"role": "assistant", "content": words[-1]}]
        out.append({"messages": messages})
    return out


def composed_plan(out: Path, *, max_steps: int = 8):
    """A tiny GPT-2 plan whose dataset is a real compose (two sources, one weighted, validation split)."""
    make_tokenizer(out / "tok")
    (out / "src").mkdir(parents=True, exist_ok=True)
    records = chats(90)
    for name, part in (("a", records[:60]), ("b", records[60:])):
        (out / "src" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    plan = tiny_plan(out, train={"max_steps": max_steps, "eval_steps": 4, "save_steps": 100})
    sources = {"a": SourceSpec(path=str(out / "src/a.jsonl"), format="openai"),
               "b": SourceSpec(path=str(out / "src/b.jsonl"), format="openai", weight=2.5)}
    dataset = DatasetSpec(sources=sources, val_fraction=0.1, dedup=DedupSpec(near=False), max_tokens=128)
    return plan.model_copy(update={"dataset": dataset})


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> pipeline.ComposeResult:
    out = tmp_path_factory.mktemp("store") / "run"
    return pipeline.compose(composed_plan(out))


def jsonl_samples(path: Path) -> list[tuple[list[int], list[int]]]:
    """The independent reference: the export's lines, parsed by the standard library."""
    return [(r["input_ids"], r["labels"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.mark.parametrize("split", ["train", "val"])
def test_the_store_holds_exactly_the_jsonl_samples(composed: pipeline.ComposeResult, split: str) -> None:
    jsonl = composed.train_path if split == "train" else composed.val_path
    reference = jsonl_samples(jsonl)
    ids, labels, offsets = open_store(jsonl)
    assert isinstance(ids, np.memmap) and isinstance(labels, np.memmap)  # mapped, not read
    assert (ids.dtype, labels.dtype, offsets.dtype) == (np.int32, np.int32, np.int64)
    assert len(offsets) == len(reference) + 1 > 5
    got = [(ids[a:b].tolist(), labels[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]
    assert got == reference
    report = composed.report[split]
    assert (len(reference), len(ids)) == (report["samples"], report["tokens"])


def test_training_reads_the_store_and_gets_the_jsonl_samples(composed: pipeline.ComposeResult) -> None:
    for max_len in (128, 40):  # 40 cuts the long samples and drops those left with nothing to predict
        mapped = train_data.read_samples(composed.train_path, max_len=max_len)
        parsed = train_data.read_jsonl_samples(composed.train_path, max_len=max_len)
        assert isinstance(mapped.tokens, np.memmap) and not isinstance(parsed.tokens, np.memmap)
        assert len(mapped) == len(parsed) > 0
        for i in range(len(parsed)):
            for x, y in zip(mapped.sample(i), parsed.sample(i)):
                assert np.array_equal(x, y)
    reference = jsonl_samples(composed.train_path)
    kept = [s for s in reference if len(s[0]) >= 2 and any(x != -100 for x in s[1][1:40])]
    short = train_data.read_samples(composed.train_path, max_len=40)
    assert len(short) == len(kept) < len(reference)  # the independent count of what a 40-token cut keeps
    assert [short.sample(i)[0].tolist() for i in range(len(short))] == [s[0][:40] for s in kept]


def test_a_store_that_does_not_fit_together_is_refused(tmp_path: Path) -> None:
    from impruver.errors import DataError

    jsonl = tmp_path / "train.jsonl"
    writer = StoreWriter(store_files(jsonl), tokens=5, samples=2)
    writer.add(np.arange(5), np.arange(5), np.array([2, 3]))
    writer.close()
    assert train_data.read_samples(jsonl, max_len=8).lengths().tolist() == [2, 3]
    np.save(store_files(jsonl)["labels"], np.zeros(4, dtype=np.int32))  # another compose's labels
    with pytest.raises(DataError, match="recompose"):
        train_data.read_samples(jsonl, max_len=8)
    with pytest.raises(RuntimeError, match="announced"):
        StoreWriter(store_files(tmp_path / "x.jsonl"), tokens=5, samples=2).close()


def test_training_on_the_store_is_bitwise_the_training_on_the_jsonl(composed: pipeline.ComposeResult, tmp_path: Path,
                                                                     use_files, monkeypatch) -> None:
    from impruver.jobs import train_job

    data = composed.train_path.parent
    runs = {}
    for name, with_store in (("store", True), ("jsonl", False)):
        out = tmp_path / name
        for split in ("train", "val"):
            kept = [data / f"{split}.jsonl", *(store_files(data / f"{split}.jsonl").values() if with_store else ())]
            for file in kept:
                (out / "data").mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, out / "data" / file.name)
        plan = composed_plan(out)
        with monkeypatch.context() as patch:
            if with_store:  # the store, and only the store, is read
                patch.setattr(train_data, "read_jsonl_samples", lambda *a, **k: pytest.fail("read the JSONL"))
            train_job(plan)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = ([r["loss"] for r in records if r["event"] == "train"],
                      [r["eval_loss"] for r in records if r["event"] == "eval"],
                      (out / "model.safetensors").read_bytes())
    assert runs["store"][0] and runs["store"][1]
    assert runs["store"] == runs["jsonl"]  # losses, eval losses and final weights, bit for bit


_RANK = """
import sys
from impruver.train.data import read_samples
samples = read_samples(sys.argv[1], max_len=1 << 20)
touched = int(samples.tokens.sum(dtype="int64")) + int(samples.labels.sum(dtype="int64"))  # every page read
print(touched, flush=True)
sys.stdin.readline()  # stay alive (and mapped) until the parent has read our memory figures
"""


def _mapped_pss_kb(pid: int, files: set[str]) -> int:
    """Proportional set size (kB) of ``pid``'s mappings of ``files``, from /proc/<pid>/smaps."""
    total, current = 0, None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            current = head[5] if len(head) >= 6 else None  # a mapping's header: address perms offset dev inode path
        elif head and head[0] == "Pss:" and current in files:
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc/<pid>/smaps")
def test_two_ranks_share_one_copy_of_the_store_pages(tmp_path: Path) -> None:
    jsonl = tmp_path / "train.jsonl"
    tokens, samples = 10 << 20, 40_000  # 10 Mi tokens: 40 MiB of ids + 40 MiB of labels
    lengths = np.full(samples, tokens // samples)
    lengths[-1] += tokens - lengths.sum()
    writer = StoreWriter(store_files(jsonl), tokens=tokens, samples=samples)
    rng = np.random.default_rng(0)
    for part in np.array_split(np.arange(samples), 8):
        n = int(lengths[part].sum())
        writer.add(rng.integers(0, 50_000, n, dtype=np.int32), rng.integers(0, 50_000, n, dtype=np.int32),
                   lengths[part])
    writer.close()
    files = {str(p) for p in store_files(jsonl).values()}
    one_copy_kb = sum(os.path.getsize(p) for p in files) / 1024
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK, str(jsonl)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    try:
        sums = {rank.stdout.readline().strip() for rank in ranks}  # both have read every page
        assert len(sums) == 1
        pss = [_mapped_pss_kb(rank.pid, files) for rank in ranks]
    finally:
        for rank in ranks:
            rank.communicate("\n", timeout=60)
    # Each rank alone maps all of it (RSS would count it twice); proportionally they hold about one copy.
    print("PSS of the store mapping per rank (kB):", pss, "one copy:", round(one_copy_kb))
    assert 0.9 * one_copy_kb < sum(pss) < 1.3 * one_copy_kb, (pss, one_copy_kb)
    assert all(p < 0.65 * one_copy_kb for p in pss), (pss, one_copy_kb)
