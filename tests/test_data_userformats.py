"""Formats users have: OpenAssistant trees, TRL prompt/completion, LLaMA-Factory's dataset_info.json, format: auto,
and per-source control of what is trained (weights, roles_to_train, train_on_last_turn_only). Golden counts on the
shared files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from data_helpers import SHARED, needs_shared
from impruver.data import convert
from impruver.data import formats as F
from impruver.data.sources import iter_items

OASST = SHARED / "oasst/openassistant_en_100_tree.jsonl"
ALPACA = SHARED / "alpaca/llamafactory_alpaca_en_demo.json"
GLAIVE = SHARED / "function_calling/llamafactory_glaive_toolcall_en_demo.json"


def spec(path: Path | str, **fields) -> SimpleNamespace:
    return SimpleNamespace(**{"path": str(path), "split": "train", "limit": None, "fraction": None, "subset": None,
                              "revision": None, "trust_remote_code": False, "format": "auto", "options": {},
                              "mapping": {}, **fields})


def converted(source_spec: SimpleNamespace, fmt: str, options: dict | None = None, **source) -> tuple[list, dict]:
    settings = {"name": "s", "format": fmt, "options": options or {}, "mapping": {}, "system": None, **source}
    counts = convert.new_counts()
    found = [c for _, c in convert.convert_items(iter_items(source_spec, name="s", seed=0), settings, "raise",
                                                 counts)]
    return found, counts


@needs_shared
def test_oasst_trees_main_branch_all_branches_and_rank_threshold():
    trees = [json.loads(line) for line in OASST.read_text().splitlines()]
    main, counts = converted(spec(OASST), "oasst")
    assert len(main) == 100 and counts["loaded"] == 100
    for tree, conversation in zip(trees, main):
        messages = conversation["messages"]
        assert messages[0]["content"] == tree["prompt"]["text"] and messages[-1]["role"] == "assistant"
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        node = tree["prompt"]  # the main branch follows rank 0 wherever replies are ranked
        for message in messages[1:]:
            ranked = [r for r in node["replies"] if r.get("rank") is not None]
            node = min(ranked, key=lambda r: r["rank"]) if ranked else node["replies"][0]
            assert message["content"] == node["text"]

    def leaf_paths(node, path):  # an independent count: every leaf, its path cut back to the last answer
        if not node["replies"]:
            while path and path[-1]["role"] != "assistant":
                path = path[:-1]
            return 1 if path else 0
        return sum(leaf_paths(r, [*path, r]) for r in node["replies"])

    every, _ = converted(spec(OASST), "oasst", {"branch": "all"})
    assert len(every) == sum(leaf_paths(t["prompt"], [t["prompt"]]) for t in trees) == 626
    best, _ = converted(spec(OASST), "oasst", {"branch": "all", "max_rank": 0})
    assert len(best) == 127
    assert all(m["content"] != "" for c in best for m in c["messages"])


def test_prompt_completion_standard_and_conversational():
    (standard,) = F.prompt_completion({"prompt": "The sky is", "completion": " blue."})
    assert standard["messages"] == [{"role": "user", "content": "The sky is"},
                                    {"role": "assistant", "content": " blue."}]
    (chat,) = F.prompt_completion({
        "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                   {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        "completion": [{"role": "assistant", "content": "d"}]})
    trained = [m["content"] for m in chat["messages"] if m["role"] == "assistant" and m.get("train", True)]
    assert trained == ["d"]  # completion-only loss: the prompt's assistant turn is context
    with pytest.raises(F.RecordError, match="only assistant messages"):
        F.prompt_completion({"prompt": [{"role": "user", "content": "a"}],
                             "completion": [{"role": "user", "content": "b"}]})


@needs_shared
def test_prompt_completion_golden_count_on_alpaca():
    found, counts = converted(spec(ALPACA), "prompt_completion", {"prompt_field": "instruction",
                                                                  "completion_field": "output"})
    assert len(found) == counts["loaded"] == 999


@needs_shared
@pytest.mark.parametrize(("path", "expected"), [
    ("alpaca/llamafactory_alpaca_en_demo.json", "instruct"),
    ("alpaca/llamafactory_lima.json", "instruct"),
    ("alpaca_ru/rulm_tasks_saiga_mistral_7b_answers.jsonl", "instruct"),
    ("sharegpt/fastchat_dummy_conversation.json", "sharegpt"),
    ("messages/llamafactory_v1_sft_demo.jsonl", "openai"),
    ("function_calling/llamafactory_glaive_toolcall_en_demo.json", "sharegpt"),
    ("function_calling/llamafactory_reason_tool_use_demo_50.jsonl", "openai"),
    ("oasst/openassistant_en_100_tree.jsonl", "oasst"),
    ("saiga_ru/rulm_ru_chargen_seed.jsonl", "roleplay"),
    ("pretrain/llamafactory_c4_demo.jsonl", "text"),
])
def test_format_auto_names_what_the_records_are(path, expected):
    from impruver.data.pipeline import resolve_format

    fmt, _, why = resolve_format(spec(SHARED / path), "s", 0)
    assert fmt == expected and why.startswith("detected: ")


def test_format_auto_refuses_records_no_format_fits(tmp_path):
    from impruver.data.pipeline import resolve_format
    from impruver.errors import DataError

    path = tmp_path / "odd.jsonl"
    path.write_text('{"question": "q", "reply": "r"}\n')
    with pytest.raises(DataError, match=r"dataset.sources.s.format: auto: no known format fits records with "
                                        r"fields question, reply"):
        resolve_format(spec(path), "s", 0)


def dataset_info(tmp_path: Path, **changes) -> Path:
    """The real dataset_info.json entries, their files pointing at the shared copies."""
    real = json.loads((SHARED / "meta/llamafactory_dataset_info.json").read_text())
    info = {"alpaca_en_demo": {**real["alpaca_en_demo"], "file_name": str(ALPACA)},
            "glaive_toolcall_en_demo": {**real["glaive_toolcall_en_demo"], "file_name": str(GLAIVE)}}
    for name, extra in changes.items():
        info[name] = {**info[name], **extra}
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps(info))
    return path


@needs_shared
def test_llamafactory_dataset_info_as_a_source(tmp_path):
    from impruver.data.pipeline import resolve_format
    from impruver.errors import DataError

    listing = dataset_info(tmp_path, alpaca_en_demo={"num_samples": 100})
    alpaca = spec(listing, subset="alpaca_en_demo")
    fmt, options, why = resolve_format(alpaca, "s", 0)
    assert (fmt, options, why) == ("instruct", {}, "LLaMA-Factory formatting 'alpaca'")
    found, _ = converted(alpaca, fmt, options)
    assert len(found) == 100  # num_samples
    glaive = spec(listing, subset="glaive_toolcall_en_demo")
    fmt, options, _ = resolve_format(glaive, "s", 0)
    assert fmt == "sharegpt" and options == {"field": "conversations", "tools_field": "tools"}
    found, _ = converted(glaive, fmt, options)
    assert len(found) == 300 and sum(1 for c in found if c["tools"]) == 191
    with pytest.raises(DataError, match="no dataset 'alpaca_en_dem' in it.*alpaca_en_demo"):
        list(iter_items(spec(listing, subset="alpaca_en_dem"), name="s", seed=0))


@needs_shared
def test_compose_reads_dataset_info_and_auto_and_names_the_format(tmp_path):
    from test_data_pipeline import demo_plan

    from impruver.data import pipeline

    listing = dataset_info(tmp_path, alpaca_en_demo={"num_samples": 40})
    plan = demo_plan(tmp_path, {"lf": {"path": str(listing), "subset": "alpaca_en_demo", "format": "auto"},
                                "chats": {"path": str(SHARED / "sharegpt/fastchat_dummy_conversation.json"),
                                          "format": "auto", "limit": 30}})
    report = pipeline.compose(plan).report["sources"]
    assert report["lf"]["format"] == "instruct (LLaMA-Factory formatting 'alpaca')" and report["lf"]["loaded"] == 40
    assert report["chats"]["format"] == "sharegpt (detected: 'conversations' of {from, value})"
    assert report["chats"]["loaded"] == 30


def test_weights_roles_to_train_and_last_turn_only():
    from impruver.data.messages import select_trained
    from impruver.data.render import Renderer
    from impruver.data.templates import CHATML

    record = {"messages": [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "bad answer", "weight": 0},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "calling", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "final", "loss_weight": 1}]}
    (conversation,) = F.openai(record)
    renderer = Renderer.from_template(CHATML, {})

    def trained(conv):
        text, spans = renderer.text_and_spans(conv)
        return [text[a:b] for a, b in spans]

    assert trained(conversation) == ["calling<|im_end|>", '{"name": "f", "arguments": {}}<|im_end|>',
                                     "final<|im_end|>"]
    calls_only = select_trained(conversation, frozenset({"function_call"}))
    assert trained(calls_only) == ['{"name": "f", "arguments": {}}<|im_end|>']
    assert trained(select_trained(conversation, last_turn_only=True)) == ["final<|im_end|>"]
    with pytest.raises(F.RecordError, match="bad_weight"):
        F.openai({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                                  "weight": 0.5}]})
    with pytest.raises(F.RecordError, match="nothing left to train"):
        select_trained({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                       frozenset({"function_call"}))
