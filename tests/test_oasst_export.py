"""Flat chat export: OpenAssistant trees (and any other format) written as one conversation a line, messages format,
by `impruver compose --export-messages PATH`; read back with `format: openai` it gives the same conversations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_helpers import SHARED, needs_shared
from test_train_support import tiny_plan
from impruver.data import convert, pipeline
from impruver.data.sources import iter_items
from impruver.plan import DatasetSpec, SourceSpec

OASST = SHARED / "oasst/openassistant_en_100_tree.jsonl"


def plan_of(tmp_path: Path, sources: dict[str, dict], **dataset):
    base = tiny_plan(tmp_path / "out")  # the model and tokenizer are not read: nothing is tokenized
    spec = DatasetSpec(sources={k: SourceSpec(**v) for k, v in sources.items()}, **dataset)
    return base.model_copy(update={"dataset": spec})


def conversations(path: Path, fmt: str, **options) -> list[dict]:
    from types import SimpleNamespace

    spec = SimpleNamespace(path=str(path), split="train", limit=None, fraction=None, subset=None)
    source = {"name": "s", "format": fmt, "options": options, "mapping": {}, "system": None}
    return [c for _, c in convert.convert_items(iter_items(spec, name="s", seed=0), source, "raise",
                                                convert.new_counts())]


def tree_paths(node: dict, path: list[dict]) -> list[list[str]]:
    """An independent reading of a tree: the texts of every path from the prompt to a leaf, cut back to its last
    assistant message (deleted or review-failed replies left out, as the export leaves them)."""
    replies = [r for r in node["replies"] if not r.get("deleted") and r.get("review_result") is not False]
    if not replies:
        while path and path[-1]["role"] != "assistant":
            path = path[:-1]
        return [[m["text"] for m in path]] if path else []
    return [p for r in replies for p in tree_paths(r, [*path, r])]


@needs_shared
@pytest.mark.parametrize(("branch", "expected"), [("main", 100), ("all", 626)])
def test_oasst_trees_export_as_flat_chats_with_golden_counts(tmp_path: Path, branch: str, expected: int) -> None:
    plan = plan_of(tmp_path, {"oasst": {"path": str(OASST), "format": "oasst", "options": {"branch": branch}}})
    target = tmp_path / "flat" / "oasst.jsonl"
    assert pipeline.write_messages(plan, target) == {"oasst": expected}
    lines = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == expected
    for line in lines:
        assert set(line) == {"messages"}
        assert [m["role"] for m in line["messages"]] == ["user", "assistant"] * (len(line["messages"]) // 2)
        assert all(set(m) == {"role", "content"} for m in line["messages"])
    trees = [json.loads(line) for line in OASST.read_text(encoding="utf-8").splitlines()]
    if branch == "all":  # every root-to-leaf path, each exactly once
        reference = sorted(p for t in trees for p in tree_paths(t["prompt"], [t["prompt"]]))
        assert sorted([m["content"] for m in line["messages"]] for line in lines) == reference
    else:  # one per tree, in file order, starting at its prompt
        assert [line["messages"][0]["content"] for line in lines] == [t["prompt"]["text"] for t in trees]
    assert conversations(target, "openai") == [{**c, "tools": None} for c in conversations(OASST, "oasst",
                                                                                            branch=branch)]


def test_what_the_conversion_decides_survives_the_round_trip(tmp_path: Path) -> None:
    records = [{"messages": [{"role": "user", "content": "weather in Paris?"},
                             {"role": "assistant", "content": "", "reasoning_content": "call the tool",
                              "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                              "arguments": '{"city": "Paris"}'}}]},
                             {"role": "tool", "content": "sunny"},
                             {"role": "assistant", "content": "It is sunny."},
                             {"role": "user", "content": "thanks"},
                             {"role": "assistant", "content": "You are welcome."}],
                "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]}]
    source = tmp_path / "calls.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    plan = plan_of(tmp_path, {"calls": {"path": str(source), "format": "openai", "system": "Be brief.",
                                        "train_on_last_turn_only": True}})
    target = tmp_path / "flat.jsonl"
    pipeline.write_messages(plan, target)
    (line,) = [json.loads(x) for x in target.read_text().splitlines()]
    assert line["messages"][0] == {"role": "system", "content": "Be brief."}
    assert [m.get("weight", 1) for m in line["messages"]] == [1, 1, 0, 1, 0, 1, 1]  # only the last answer trains
    expected = pipeline._settings(plan, Path("."))["sources"]["calls"]
    (direct,) = [c for _, c in convert.convert_items(iter_items(plan.sources["calls"], name="calls", seed=0),
                                                     expected, "raise", convert.new_counts())]
    assert conversations(target, "openai") == [direct]


@needs_shared
def test_cli_compose_export_messages_flag(tmp_path: Path) -> None:
    from impruver.jobs import stage_flags

    assert stage_flags("compose")["export_messages"] is True  # takes a value
    target = tmp_path / "oasst_flat.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "impruver", "compose", "preset=demo", f"output_dir={tmp_path / 'o'}",
                           f"dataset.sources={{oasst:{{path:'{OASST}',format:oasst}}}}", "dataset.max_tokens=2048",
                           "--export-messages", str(target)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(target.read_text(encoding="utf-8").splitlines()) == 100
    assert (tmp_path / "o" / "data" / "train.ids.npy").is_file()  # and the compose itself ran


SEED = SHARED / "oasst/openassistant_realistic_seed_data.json"


@needs_shared
@pytest.mark.parametrize(("branch", "expected"), [("main", 74), ("all", 158)])
def test_the_flat_message_export_is_assembled_into_trees(tmp_path: Path, branch: str, expected: int) -> None:
    """OpenAssistant's messages linked by parent ids: every path from a prompt to a leaf (branch: all), cut back
    to its last answer, checked against the parent links read here independently."""
    messages = json.loads(SEED.read_text(encoding="utf-8"))
    children: dict = {}
    for m in messages:
        children.setdefault(m["parent_message_id"], []).append(m)

    def paths(node: dict, path: list[dict]) -> list[list[str]]:
        replies = children.get(node["user_message_id"], [])
        if not replies:
            while path and path[-1]["role"] != "assistant":
                path = path[:-1]
            return [[m["text"] for m in path]] if path else []
        return [p for r in replies for p in paths(r, [*path, r])]

    roots = children[None]
    plan = plan_of(tmp_path, {"seed": {"path": str(SEED), "format": "oasst", "options": {"branch": branch}}})
    target = tmp_path / "seed_flat.jsonl"
    assert pipeline.write_messages(plan, target) == {"seed": expected}
    lines = [[m["content"] for m in json.loads(x)["messages"]] for x in target.read_text().splitlines()]
    if branch == "all":
        assert sorted(lines) == sorted(p for r in roots for p in paths(r, [r]))
    else:  # unranked replies: the first one at every turn, one conversation per prompt, in file order
        assert [line[0] for line in lines] == [r["text"] for r in roots]
        assert all(line in paths(r, [r]) for line, r in zip(lines, roots))
