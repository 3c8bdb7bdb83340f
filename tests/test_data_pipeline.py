"""`impruver compose` end to end: outputs, report, cache, determinism, dedup, split, errors, the shipped mixes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from impruver.data import pipeline
from impruver.data.store import store_files
from impruver.errors import DataError
from impruver.plan import DatasetSpec, DedupSpec, SourceSpec

WORDS = ("apple banana cherry dragon eagle falcon garden harbor island jungle kettle lemon mountain needle ocean "
         "pepper quartz river silver tiger umbrella valley window yellow zebra").split()


def chat(i: int, *, system: str | None = None) -> dict:
    """A distinct conversation (words picked by i, so no two are near-duplicates)."""
    words = [WORDS[(i * 7 + k * (i % 5 + 1)) % len(WORDS)] for k in range(12)]
    question = f"question {i}: " + " ".join(words[:6])
    answer = f"answer {i}: " + " ".join(reversed(words))
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


def make(overrides: list[str]):
    """compose -> make_plan (impruver.plan() breaks once the impruver.compose module is imported: see the report)."""
    from impruver.compose import compose
    from impruver.plan import make_plan

    composed = compose(overrides)
    return make_plan(composed.config, choices=composed.choices)


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def demo_plan(tmp_path: Path, sources: dict[str, dict] | None = None, **dataset):
    """The demo preset (tiny GPT-2, BPE trained on the data, saiga template) over the given sources."""
    base = make(["preset=demo", f"output_dir={tmp_path / 'out'}"])
    if sources is None:
        sources = {"chats": {"path": str(write_jsonl(tmp_path / "chats.jsonl", [chat(i) for i in range(60)])),
                             "format": "openai"}}
    spec = DatasetSpec(sources={k: SourceSpec(**v) for k, v in sources.items()},
                       **{"val_fraction": 0.1, "dedup": DedupSpec(), "max_tokens": 256, **dataset})
    return base.model_copy(update={"dataset": spec})


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_compose_writes_samples_report_and_tokenizer(tmp_path, capsys):
    plan = demo_plan(tmp_path)
    result = pipeline.run(plan, inspect=2)
    assert not result.reused
    train, val = lines(result.train_path), lines(result.val_path)
    assert len(train) + len(val) == 60 and len(val) == 6
    for sample in train + val:
        assert set(sample) == {"input_ids", "labels", "attention_mask"}
        assert len(sample["input_ids"]) == len(sample["labels"]) == len(sample["attention_mask"]) <= 256
        assert any(label != -100 for label in sample["labels"])
        assert all(label in (-100, token) for label, token in zip(sample["labels"], sample["input_ids"]))
    report = json.loads(result.report_path.read_text())
    assert report["sources"]["chats"] == {
        "format": "openai", "loaded": 60, "converted": 60, "invalid": {}, "skipped": {}, "too_long": 0, "no_trainable": 0,
        "truncated": 0, "dropped_messages": 0, "reasoning_dropped": 0,
        "duplicates": 0, "near_duplicates": 0, "near_kept_by_exact_jaccard": 0, "kept": 60, "weighted_out": 0, "train_samples": 54, "val_samples": 6}
    assert 0 < report["train"]["trainable_fraction"] < 1 and report["fingerprint"] == result.fingerprint
    tok = pipeline.load_composed_tokenizer(plan)
    assert tok.chat_template and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    first = train[0]
    trained = [t for t, label in zip(first["input_ids"], first["labels"]) if label != -100]
    assert tok.decode(trained).startswith("answer ") and tok.decode(trained).endswith("</s>")
    out = capsys.readouterr().out
    assert "dataset composition" in out and "sample 2" in out
    assert not list(result.train_path.parent.glob(".compose-*"))  # no temporary leftovers


def test_cache_is_reused_and_any_change_recomposes(tmp_path):
    plan = demo_plan(tmp_path)
    first = pipeline.ensure_composed(plan)
    stamp = first.train_path.stat().st_mtime_ns
    again = pipeline.ensure_composed(plan)
    assert again.reused and again.fingerprint == first.fingerprint and first.train_path.stat().st_mtime_ns == stamp
    changed = plan.model_copy(update={"dataset": plan.dataset.model_copy(update={"seed": 7})})
    assert not pipeline.ensure_composed(changed).reused
    template = plan.model_copy(update={"tokenizer": plan.tokenizer.model_copy(update={"chat_template": "chatml"})})
    assert pipeline.fingerprint(template) != pipeline.fingerprint(plan)
    source = Path(plan.dataset.sources["chats"].path)
    source.write_text(source.read_text() + json.dumps(chat(999)) + "\n")
    assert not pipeline.ensure_composed(plan).reused  # the data changed


def test_outputs_are_byte_identical_and_independent_of_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK", 8)  # several chunks, so two worker processes really share the work
    records = [chat(i) for i in range(80)]
    sources = {"chats": {"path": str(write_jsonl(tmp_path / "c.jsonl", records)), "format": "openai"}}
    outputs = []
    for num_proc in (2, 2, 1):
        plan = demo_plan(tmp_path, sources, num_proc=num_proc)
        result = pipeline.compose(plan, force=True)
        stores = [f.read_bytes() for split in (result.train_path, result.val_path)
                  for f in store_files(split).values()]
        outputs.append([result.train_path.read_bytes(), result.val_path.read_bytes(),
                        (result.tokenizer_dir / "tokenizer.json").read_bytes(), *stores])
    assert outputs[0] == outputs[1] == outputs[2]


def test_dedup_exact_and_near_across_sources_before_the_split(tmp_path):
    base = [chat(i) for i in range(30)]
    long_text = " ".join(WORDS * 3)
    near = {"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": long_text}]}
    near_copy = json.loads(json.dumps(near))
    near_copy["messages"][1]["content"] = long_text.replace("zebra", "horse", 1)  # one word of 75 changed
    reversed_text = {"messages": [{"role": "user", "content": "tell me"},
                                  {"role": "assistant", "content": " ".join(reversed(long_text.split()))}]}
    sources = {
        "a": {"path": str(write_jsonl(tmp_path / "a.jsonl", [*base, near])), "format": "openai"},
        "b": {"path": str(write_jsonl(tmp_path / "b.jsonl", [*base[:5], near_copy, reversed_text])),
              "format": "openai", "system": "a shared system prompt is not what makes two chats the same"},
    }
    result = pipeline.compose(demo_plan(tmp_path, sources, dedup=DedupSpec(threshold=0.8)))
    report = json.loads(result.report_path.read_text())["sources"]
    assert report["a"]["duplicates"] == 0 and report["a"]["kept"] == 31
    assert report["b"]["duplicates"] == 6 and report["b"]["near_duplicates"] == 1
    assert report["b"]["kept"] == 1  # the reversed text is not a duplicate: shingles keep word order
    train = {json.dumps(s) for s in lines(result.train_path)}
    assert not train & {json.dumps(s) for s in lines(result.val_path)}  # nothing leaks into validation


def test_split_by_seed_weights_limit_fraction_slice(tmp_path):
    path = str(write_jsonl(tmp_path / "c.jsonl", [chat(i) for i in range(40)]))
    one = pipeline.compose(demo_plan(tmp_path, {"c": {"path": path, "format": "openai"}}, val_size=5, seed=1))
    val_one = one.val_path.read_bytes()
    two = pipeline.compose(demo_plan(tmp_path, {"c": {"path": path, "format": "openai"}}, val_size=5, seed=2))
    assert len(lines(two.val_path)) == 5 and two.val_path.read_bytes() != val_one
    sources = {"heavy": {"path": path, "format": "openai", "weight": 2.0, "split": "train[:10]"},
               "light": {"path": path, "format": "openai", "split": "train[50%:]", "limit": 8},
               "some": {"path": path, "format": "openai", "fraction": 0.5, "split": "train[10:20]"},
               "half": {"path": path, "format": "openai", "weight": 0.5, "split": "train[20:40]"}}
    result = pipeline.compose(demo_plan(tmp_path, sources, val_size=0, dedup=DedupSpec(exact=False, near=False)))
    report = json.loads(result.report_path.read_text())["sources"]
    assert report["heavy"]["loaded"] == 10 and report["heavy"]["train_samples"] == 20
    assert report["light"]["loaded"] == 8
    assert 0 < report["some"]["loaded"] < 10
    half = report["half"]
    assert half["loaded"] == 20 and 0 < half["train_samples"] < 20 and half["train_samples"] + half["weighted_out"] == 20
    assert len(lines(result.train_path)) == 20 + 8 + report["some"]["loaded"] + half["train_samples"]


BAD = {
    "broken_json": (json.dumps(chat(100)) + '\n{"messages": [}\n', "openai", {}, r"bad\.jsonl:2: not valid JSON"),
    "missing_mapped_field": (json.dumps({"q": "a", "output": "b"}) + "\n", "instruct", {"mapping": {"вопрос": "instruction"}},
                             r"bad\.jsonl:1: no field 'вопрос'"),
    "unknown_role": (json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n", "openai", {},
                     r"bad\.jsonl:1: message 0 has role 'robot'"),
    "empty_file": ("", "openai", {}, r"bad\.jsonl is empty"),
    "odd_shape": (json.dumps({"name": "x", "context": "y", "dialogues": [{"chat": ["not a turn"]}]}) + "\n",
                  "roleplay", {}, r"bad\.jsonl:1: the format failed on this record: AttributeError"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_with_one_clear_message_and_no_partial_output(tmp_path, case):
    text, fmt, extra, message = BAD[case]
    good = write_jsonl(tmp_path / "good.jsonl", [chat(i) for i in range(20)])
    (tmp_path / "bad.jsonl").write_text(text)
    previous = pipeline.compose(demo_plan(tmp_path, {"good": {"path": str(good), "format": "openai"}}))
    before = previous.train_path.read_bytes()
    sources = {"good": {"path": str(good), "format": "openai"},
               "bad": {"path": str(tmp_path / "bad.jsonl"), "format": fmt, **extra}}
    with pytest.raises(DataError, match=message):
        pipeline.compose(demo_plan(tmp_path, sources))
    assert previous.train_path.read_bytes() == before  # the last good outputs are untouched
    assert not list(previous.train_path.parent.glob(".compose-*"))


def test_missing_path_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no file or folder at .*nowhere.jsonl"):
        pipeline.compose(demo_plan(tmp_path, {"x": {"path": str(tmp_path / "nowhere.jsonl"), "format": "openai"}}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="IlyaGusev/ru_turbo_saiga' is a Hugging Face Hub dataset id .*local files"):
        pipeline.compose(demo_plan(tmp_path, {"x": {"path": "IlyaGusev/ru_turbo_saiga", "format": "saiga"}}))
    assert not (tmp_path / "out" / "data" / "train.jsonl").exists()


def test_on_error_skip_counts_every_reason(tmp_path):
    records = [chat(i) for i in range(10)]
    broken = "".join(json.dumps(r) + "\n" for r in records) + '{"messages": [\n' + \
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n" + \
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n" + \
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]},
                                 {"role": "assistant", "content": "a"}]}) + "\n"
    (tmp_path / "mixed.jsonl").write_text(broken)
    result = pipeline.compose(demo_plan(tmp_path, {"m": {"path": str(tmp_path / "mixed.jsonl"), "format": "openai"}},
                                        on_error="skip"))
    row = json.loads(result.report_path.read_text())["sources"]["m"]
    assert row["loaded"] == 14 and row["kept"] == 10
    assert row["invalid"] == {"broken_json": 1, "no_assistant_turn": 1, "non_text_content": 1, "unknown_role": 1}


def test_too_long_are_counted(tmp_path):
    long = {"messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "y"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [chat(i) for i in range(10)] + [long])
    result = pipeline.compose(demo_plan(tmp_path, {"c": {"path": str(path), "format": "openai"}}))
    assert json.loads(result.report_path.read_text())["sources"]["c"]["too_long"] == 1
    only_long = write_jsonl(tmp_path / "long.jsonl", [long])
    with pytest.raises(DataError, match=r"no training sample is left.*1 too long \(max_tokens 256\)"):
        pipeline.compose(demo_plan(tmp_path, {"c": {"path": str(only_long), "format": "openai"}}))


# -- the shipped dataset options, their Hub sources swapped for local files of the same shapes ----------------------


def saiga2_fixtures(folder: Path) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    alpaca = [{"instruction": f"Задание {i}: " + " ".join(WORDS[i:i + 5]), "input": "" if i % 2 else "вход",
               "output": f"Ответ {i} " + " ".join(WORDS[i + 5:i + 9]), "alternative_output": "",
               "label": "bad_output" if i == 3 else "ok", "all_labels": ["ok"], "agreement": 1.0, "overlap": 3}
              for i in range(8)]
    evol = [{"instruction": f"Эволюция {i} " + " ".join(WORDS[i:i + 4]), "output": f"Вывод {i}"} for i in range(6)]
    saiga = [{"messages": [{"role": "system", "content": "Ты — Сайга."}, {"role": "user", "content": f"Вопрос {i}"},
                           {"role": "bot", "content": f"Ответ бота {i} " + WORDS[i]}], "seed": "x", "source": "y"}
             for i in range(6)]
    # ru_sharegpt_cleaned as datasets loads it: messages as a struct of lists (here: a parquet file).
    sharegpt = pa.table({"messages": [{"role": ["user", "bot", "user", "bot"],
                                       "content": [f"Привет {i}", f"Здравствуй {i}", "Как дела?", f"Хорошо {WORDS[i]}"]}
                                      for i in range(5)], "id": [str(i) for i in range(5)]})
    pq.write_table(sharegpt, folder / "ru_sharegpt_cleaned.parquet")
    oasst = [{"messages": [{"role": "user", "content": f"oasst {i} {WORDS[i]}"},
                           {"role": "bot", "content": f"ответ {i} {WORDS[-i]}"}]} for i in range(4)]
    gpt4 = [{"instruction": f"gpt4 {i} {WORDS[i]}", "input": "", "output": f"out {i}", "full_output": "..."}
            for i in range(5)]
    paths = {"ru_turbo_alpaca": write_jsonl(folder / "ru_turbo_alpaca.jsonl", alpaca),
             "ru_turbo_alpaca_evol_instruct": write_jsonl(folder / "evol.jsonl", evol),
             "ru_turbo_saiga": write_jsonl(folder / "ru_turbo_saiga.jsonl", saiga),
             "ru_sharegpt_cleaned": folder / "ru_sharegpt_cleaned.parquet",
             "oasst1_ru_main_branch": write_jsonl(folder / "oasst.jsonl", oasst),
             "ru_instruct_gpt4": write_jsonl(folder / "gpt4.jsonl", gpt4)}
    return {name: str(path) for name, path in paths.items()}


def test_saiga2_mix_composes_from_local_files(tmp_path):
    paths = saiga2_fixtures(tmp_path / "saiga2")
    plan = make(["model=tiny", "method=scratch", "tokenizer=auto", "dataset=saiga2", f"output_dir={tmp_path / 'o'}",
                 *[f"dataset.sources.{name}.path={path}" for name, path in paths.items()]])
    assert "gpt_roleplay_realm" not in plan.sources  # off by default
    result = pipeline.ensure_composed(plan)
    report = json.loads(result.report_path.read_text())["sources"]
    assert report["ru_turbo_alpaca"]["skipped"] == {"bad_output": 1} and report["ru_turbo_alpaca"]["kept"] == 7
    assert report["ru_sharegpt_cleaned"]["kept"] == 5 and report["ru_turbo_saiga"]["kept"] == 6
    assert sum(r["kept"] for r in report.values()) == 7 + 6 + 6 + 5 + 4 + 5
    tok = pipeline.load_composed_tokenizer(plan)
    sample = lines(result.train_path)[0]
    assert "<s>bot\n" in tok.decode(sample["input_ids"]) or "<s>user\n" in tok.decode(sample["input_ids"])


def test_glaive_fc_ru_composes_from_a_local_file(tmp_path):
    records = []
    for i in range(12):
        messages = [
            {"role": "system", "content": "Вы — помощник с доступом к функциям: {\"name\": \"get_rate\"}"},
            {"role": "user", "content": f"Какой курс {WORDS[i]}?"},
            {"role": "function_call", "content": json.dumps({"name": "get_rate", "arguments": json.dumps({"c": WORDS[i]})})},
            {"role": "function_response", "content": json.dumps({"rate": i})},
            {"role": "assistant", "content": f"Курс {WORDS[i]} равен {i}."}]
        records.append({"messages": json.dumps(messages, ensure_ascii=False), "functions": "[]"})
    path = write_jsonl(tmp_path / "glaive.jsonl", records)
    plan = make(["model=tiny", "method=scratch", "tokenizer=auto", "dataset=glaive_fc_ru",
                 f"output_dir={tmp_path / 'o'}", f"dataset.sources.glaive_fc_ru.path={path}"])
    result = pipeline.ensure_composed(plan)
    assert json.loads(result.report_path.read_text())["sources"]["glaive_fc_ru"]["kept"] == 12
    tok = pipeline.load_composed_tokenizer(plan)
    sample = lines(result.train_path)[0]
    trained = tok.decode([t for t, label in zip(sample["input_ids"], sample["labels"]) if label != -100])
    assert trained.startswith('{"name": "get_rate", "arguments": {"c": ') and "</s>Курс" in trained
    assert "Какой курс" not in trained and '"rate"' not in trained  # user turn and function response not trained


def test_cli_reports_bad_input_with_exit_status_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "impruver", "compose", f"output_dir={tmp_path / 'o'}",
                           f"dataset.sources.demo.path={tmp_path / 'missing.jsonl'}"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "missing.jsonl" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o" / "data" / "train.jsonl").exists()


def test_text_csv_and_packaged_sources(tmp_path):
    (tmp_path / "book.txt").write_text("First paragraph, one line.\n\nSecond paragraph\nover two lines.\n\n\n" +
                                       " ".join(WORDS * 20) + "\n", encoding="utf-8")
    import csv

    with (tmp_path / "qa.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["вопрос", "ответ"])
        writer.writeheader()
        writer.writerows([{"вопрос": f"вопрос {i} {WORDS[i]}", "ответ": f"ответ {i}"} for i in range(6)])
    sources = {"book": {"path": str(tmp_path / "book.txt"), "format": "text", "max_tokens": 64},
               "qa": {"path": str(tmp_path / "qa.csv"), "format": "instruct",
                      "mapping": {"вопрос": "instruction", "ответ": "output"}},
               "demo": {"path": "pkg://impruver/assets/demo/chats.jsonl", "format": "openai", "limit": 20}}
    result = pipeline.compose(demo_plan(tmp_path, sources, val_size=0))
    report = json.loads(result.report_path.read_text())["sources"]
    assert report["book"]["loaded"] == 3 and report["book"]["train_samples"] > 3  # the long paragraph is cut up
    assert report["qa"]["kept"] == 6 and report["demo"]["loaded"] == 20
    samples = lines(result.train_path)
    text_samples = samples[:report["book"]["train_samples"]]
    assert all(s["labels"] == s["input_ids"] and len(s["input_ids"]) <= 64 for s in text_samples)


def test_the_demo_preset_composes(tmp_path):
    plan = make(["preset=demo", f"output_dir={tmp_path / 'demo'}"])
    result = pipeline.ensure_composed(plan)
    assert result.report["train"]["samples"] > 100 and result.report["val"]["samples"] > 5
    assert pipeline.ensure_composed(plan).reused
    assert pipeline.load_composed_tokenizer(plan).chat_template


def test_hub_sources_go_through_datasets_load_dataset(tmp_path, monkeypatch):
    """The Hub path (network replaced by an in-memory dataset): split passed on, no remote code, struct of lists."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        rows = [{"role": ["user", "bot"], "content": [f"вопрос {i} {WORDS[i]}", f"ответ {i} {WORDS[-i]}"]}
                for i in range(12)]
        return datasets.Dataset.from_dict({"messages": rows}).to_iterable_dataset()

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    sources = {"saiga": {"path": "IlyaGusev/ru_turbo_saiga", "format": "saiga", "split": "train[:5]"}}
    result = pipeline.compose(demo_plan(tmp_path, sources, val_size=1))
    # train[:5] streams: the split by name, and the first five records taken as they come
    assert calls and all(c == ("IlyaGusev/ru_turbo_saiga", None, {"split": "train", "revision": None,
                                                                 "streaming": True}) for c in calls)
    assert json.loads(result.report_path.read_text())["sources"]["saiga"]["loaded"] == 5


def test_empty_chunks_and_weighted_copies_are_written_in_order(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n" * 3, encoding="utf-8")  # a chunk with no sample: an empty shard
    sources = {"broken": {"path": str(broken), "format": "openai"},
               "chats": {"path": str(write_jsonl(tmp_path / "chats.jsonl", [chat(i) for i in range(30)])),
                         "format": "openai", "weight": 3.0}}
    result = pipeline.compose(demo_plan(tmp_path, sources, on_error="skip"))
    assert result.report["sources"]["broken"]["invalid"] == {"broken_json": 3}
    train = result.train_path.read_bytes().splitlines(keepends=True)
    val = result.val_path.read_bytes().splitlines(keepends=True)
    assert len(train) % 3 == 0 and all(train[i] == train[i + 1] == train[i + 2] for i in range(0, len(train), 3))
    distinct = train[::3]
    assert len(set(distinct)) == len(distinct) and not set(distinct) & set(val)
    assert len(distinct) + len(val) == 30 and result.report["train"]["samples"] == len(train)
    assert all(line.endswith(b"}\n") and json.loads(line)["input_ids"] for line in train + val)
