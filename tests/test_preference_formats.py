"""Preference formats: every shape users have, into canonical pair / labelled records; golden counts on the two
real LLaMA-Factory files in ../shared/data/preference (read in place)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from impruver import registry
from impruver.data.messages import RecordError, SkipRecord
from impruver.data.preference import (
    LABELLED,
    PAIR,
    alpaca_preference,
    openai_preference,
    produces_of,
    sharegpt_preference,
    split_shared_prompt,
    trl_kto,
    trl_preference,
    unpair,
)

U = {"role": "user", "content": "2+2?"}
SYS = {"role": "system", "content": "Be brief."}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def test_formats_are_registered_and_say_what_they_produce() -> None:
    for name in ("trl_preference", "alpaca_preference", "sharegpt_preference", "openai_preference"):
        assert produces_of(registry.lookup("formats", name)) == PAIR
    assert produces_of(registry.lookup("formats", "trl_kto")) == LABELLED
    assert produces_of(registry.lookup("formats", "sharegpt")) == "conversation"  # SFT formats


def test_trl_text_and_messages() -> None:
    pair = trl_preference({"prompt": "2+2?", "chosen": "4", "rejected": "5", "system": "Be brief."})[0]
    assert pair == {"prompt": [SYS, U], "chosen": [a("4")], "rejected": [a("5")], "tools": None}
    conversational = {"prompt": [SYS, U], "chosen": [a("4")], "rejected": [a("5")]}
    assert trl_preference(conversational)[0] == pair


def test_trl_implicit_prompt_is_the_shared_beginning() -> None:
    history = [U, a("4"), {"role": "user", "content": "and 3+3?"}]
    pair = trl_preference({"chosen": [*history, a("6")], "rejected": [*history, a("seven")]})[0]
    assert pair["prompt"] == history
    assert (pair["chosen"], pair["rejected"]) == ([a("6")], [a("seven")])
    # answers that begin alike are still whole answers: the split never cuts into the assistant's turns
    prompt, chosen, rejected = split_shared_prompt([U, a("4"), a("x")], [U, a("4"), a("y")])
    assert (prompt, chosen, rejected) == ([U], [a("4"), a("x")], [a("4"), a("y")])


def test_trl_kto() -> None:
    record = trl_kto({"prompt": [U], "completion": [a("4")], "label": True})[0]
    assert record == {"prompt": [U], "completion": [a("4")], "label": True, "tools": None}
    assert trl_kto({"prompt": "2+2?", "completion": "5", "label": 0})[0]["label"] is False
    with pytest.raises(RecordError, match="label must be true or false"):
        trl_kto({"prompt": "2+2?", "completion": "5", "label": "bad"})


def test_alpaca_preference_with_system_input_and_history() -> None:
    record = {"instruction": "Add", "input": "2 and 2", "chosen": "4", "rejected": "22", "system": "Be brief.",
              "history": [["hi", "hello"]]}
    pair = alpaca_preference(record)[0]
    assert pair["prompt"] == [SYS, {"role": "user", "content": "hi"}, a("hello"),
                              {"role": "user", "content": "Add\n\n2 and 2"}]
    assert (pair["chosen"], pair["rejected"]) == ([a("4")], [a("22")])


def test_sharegpt_preference_with_tools() -> None:
    tools = [{"name": "calc", "parameters": {"type": "object"}}]
    record = {"conversations": [{"from": "human", "value": "2+2?"}], "tools": json.dumps(tools),
              "chosen": {"from": "function_call", "value": '{"name": "calc", "arguments": {"x": "2+2"}}'},
              "rejected": {"from": "gpt", "value": "5"}}
    pair = sharegpt_preference(record)[0]
    assert pair["prompt"] == [U]
    assert pair["chosen"] == [{"role": "function_call", "content": '{"name": "calc", "arguments": {"x": "2+2"}}'}]
    assert pair["tools"] == [{"type": "function", "function": tools[0]}]


def test_openai_preference_both_shapes() -> None:
    parts = {"role": "assistant", "content": [{"type": "text", "value": "4"}], "loss_weight": 1.0}
    whole = openai_preference({"chosen_messages": [SYS, U, parts], "rejected_messages": [SYS, U, a("5")]})[0]
    beside = openai_preference({"messages": [SYS, U], "chosen": "4", "rejected": a("5")})[0]
    assert whole == beside == {"prompt": [SYS, U], "chosen": [a("4")], "rejected": [a("5")], "tools": None}


@pytest.mark.parametrize(("record", "reason"), [
    ({"prompt": [U, a("4")], "chosen": "4", "rejected": "5"}, "prompt_ends_with_answer"),
    ({"prompt": [SYS], "chosen": "4", "rejected": "5"}, "empty_prompt"),
    ({"prompt": "2+2?", "chosen": [U], "rejected": "5"}, "bad_answer"),
    ({"prompt": "2+2?", "chosen": " ", "rejected": "5"}, "empty_message"),
    ({"prompt": "2+2?", "chosen": "4"}, "missing_field"),
    ({"chosen": [U, a("4")], "rejected": [{"role": "user", "content": "3+3?"}, a("6")]}, "empty_prompt"),
])
def test_unusable_records_name_the_reason(record: dict[str, Any], reason: str) -> None:
    with pytest.raises(RecordError) as err:
        trl_preference(record)
    assert err.value.reason == reason


def test_identical_answers_are_skipped_and_counted() -> None:
    with pytest.raises(SkipRecord) as skip:
        trl_preference({"prompt": "2+2?", "chosen": "4", "rejected": " 4 "})
    assert skip.value.reason == "identical_answers"


def test_unpair_gives_two_labelled_records() -> None:
    pair = trl_preference({"prompt": "2+2?", "chosen": "4", "rejected": "5"})[0]
    assert [(r["completion"], r["label"]) for r in unpair(pair)] == [([a("4")], True), ([a("5")], False)]


def _convert(func: Any, rows: list[dict[str, Any]]) -> tuple[Counter[str], list[dict[str, Any]]]:
    counts: Counter[str] = Counter()
    pairs = []
    for row in rows:
        try:
            pairs += func(row)
            counts["converted"] += 1
        except SkipRecord as skip:
            counts[f"skipped:{skip.reason}"] += 1
        except RecordError as exc:
            counts[f"invalid:{exc.reason}"] += 1
    return counts, pairs


def test_llamafactory_sharegpt_demo_golden_counts(shared_data: Path) -> None:
    rows = json.loads((shared_data / "preference" / "llamafactory_dpo_en_demo.json").read_text(encoding="utf-8"))
    counts, pairs = _convert(registry.lookup("formats", "sharegpt_preference"), rows)
    assert counts == {"converted": 300}
    assert Counter(len(p["prompt"]) for p in pairs) == {1: 114, 2: 80, 3: 1, 5: 57, 7: 46, 9: 1, 13: 1}
    assert sum(p["prompt"][0]["role"] == "system" for p in pairs) == 80
    assert all(p["prompt"][-1]["role"] == "user" for p in pairs)
    assert all(len(p["chosen"]) == len(p["rejected"]) == 1 for p in pairs)
    assert pairs[0]["prompt"][0]["content"].startswith("Hi! I'd like to create a new language game")
    assert pairs[0]["chosen"][0]["content"].startswith("That sounds like a fun and engaging idea!")
    assert pairs[0]["rejected"][0]["content"].startswith("Hello! I'd be happy to help you create")


def test_llamafactory_v1_messages_demo_golden_counts(shared_data: Path) -> None:
    path = shared_data / "preference" / "llamafactory_v1_dpo_demo.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    counts, pairs = _convert(registry.lookup("formats", "openai_preference"), rows)
    assert counts == {"converted": 10}
    assert all([m["role"] for m in p["prompt"]] == ["system", "user"] for p in pairs)
    assert pairs[0]["chosen"] == [a("Abdulah Hasanagic is the proud owner of AS Company in Gorazde, a small town "
                                    "located on the banks of the Drina River, near the border with Serbia, in "
                                    "Eastern Bosnia.")]
    assert pairs[0]["rejected"][0]["content"].startswith(" Abdulah Hasanagic is the proud owner of AS Company,")
