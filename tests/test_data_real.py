"""Loss masks over every chat, tool and instruct file of ../shared/data with the real tokenizers.

For every kept sample the trained tokens, decoded run by run, must be exactly the assistant / function_call turns
as the template writes them plus their end-of-turn token, and nothing else.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from data_helpers import SHARED, encoder_for, gpt2_tokenizer, mistral_tokenizer, needs_shared, qwen3_tokenizer, runs

pytestmark = needs_shared

FILES = [  # (path under ../shared/data, format)
    ("alpaca/llamafactory_alpaca_en_demo.json", "instruct"),
    ("alpaca/llamafactory_identity.json", "instruct"),
    ("alpaca/llamafactory_lima.json", "instruct"),
    ("alpaca/fastchat_pr2000_alpaca_data_cleaned_1000.json", "instruct"),
    ("alpaca/stanford_alpaca_seed_tasks.jsonl", "instruct"),
    ("alpaca_ru/rulm_gen100_ru_turbo_alpaca_early.jsonl", "instruct"),
    ("alpaca_ru/rulm_gen_example_ru_turbo_alpaca_early.json", "instruct"),
    ("alpaca_ru/rulm_ru_alpaca_seed_tasks.jsonl", "instruct"),
    ("alpaca_ru/rulm_tasks_saiga_mistral_7b_answers.jsonl", "instruct"),
    ("alpaca_ru/rulm_user_oriented_saiga13b_answers.jsonl", "instruct"),
    ("sharegpt/fastchat_dummy_conversation.json", "sharegpt"),
    ("messages/llamafactory_v1_sft_demo.jsonl", "openai"),
    ("messages/llamafactory_fork_oai.json", "openai"),
    ("function_calling/llamafactory_glaive_toolcall_en_demo.json", "sharegpt"),
    ("function_calling/llamafactory_reason_tool_use_demo_50.jsonl", "openai"),
    *[(f"function_calling/mistral_common_samples/{d}/sample.json", "openai")
      for d in ("get_weather_full", "get_weather_no_history", "get_weather_no_system_prompt", "no_tools",
                "parallel_calls", "several_calls")],
    ("saiga_ru/rulm_ru_chargen_seed.jsonl", "roleplay"),
    ("saiga_ru/rulm_en_chargen_seed.jsonl", "roleplay"),
]


def conversations(path: str, fmt: str) -> list[dict]:
    from types import SimpleNamespace

    from impruver.data import convert
    from impruver.data.sources import iter_items

    spec = SimpleNamespace(path=str(SHARED / path), split="train", limit=None, fraction=None)
    source = {"name": "t", "format": fmt, "options": {}, "mapping": {}, "system": None}
    counts = convert.new_counts()
    found = [c for _, c in convert.convert_items(iter_items(spec, name="t", seed=0), source, "raise", counts)]
    assert found and counts["converted"] == len(found)
    return found


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def qwen3_expected(messages: list[dict], trainable: list[bool]) -> list[str]:
    """What Qwen3's template writes inside each trainable turn (a re-statement of its rules, for checking)."""
    last_query = max(i for i, m in enumerate(messages) if m["role"] == "user")
    out = []
    for i, (m, train) in enumerate(zip(messages, trainable)):
        if not train:
            continue
        content, reasoning = m["content"], m.get("reasoning_content", "")
        if "</think>" in content and not reasoning:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
        if i > last_query and (i == len(messages) - 1 or reasoning):
            text = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
        else:
            text = content
        for k, call in enumerate(m.get("tool_calls", [])):  # all calls of a turn in one message
            text += ("\n" if content or k else "") + '<tool_call>\n{"name": "' + call["function"]["name"] + \
                '", "arguments": ' + json.dumps(call["function"]["arguments"], ensure_ascii=False) + "}\n</tool_call>"
        out.append(text + "<|im_end|>")
    return out


def check(tokenizer, encoder, convs, expected_runs, limit=None, roundtrip=True):
    from impruver.data.render import SourceOptions

    options = SourceOptions(max_tokens=1_000_000)
    convs = convs[:limit] if limit else convs
    kept = 0
    for conv, result in zip(convs, encoder.encode(convs, options)):
        if not isinstance(result, list):
            assert result.reason == "template_error", result  # the template's own refusal, counted by compose
            continue
        messages, trainable, tools = encoder.renderer.template_messages(conv)
        (sample,) = result
        got = [decode(tokenizer, run) for run in runs(sample.input_ids, sample.labels)]
        expected = expected_runs(messages, trainable)
        assert len(got) == len(expected), conv
        for run, want in zip(got, expected):
            # Exact, except that a token straddling the turn's start (the header's "\n" merged with content
            # that starts with whitespace) is trained: then the run starts with that bit of whitespace.
            run, want = unicodedata.normalize("NFC", run), unicodedata.normalize("NFC", want)  # Qwen normalizes
            if not roundtrip:  # SentencePiece drops a decoded run's first leading space
                run, want = run.lstrip(" "), want.lstrip(" ")
            assert run == want or (run.endswith(want) and not run[: len(run) - len(want)].strip()), (run, want)
        if roundtrip:  # byte-level BPEs decode exactly; SentencePiece adds spaces after special tokens
            text = encoder.renderer.render(messages, tools)
            assert unicodedata.normalize("NFC", decode(tokenizer, sample.input_ids)) == unicodedata.normalize("NFC", text)
        kept += 1
    assert kept


@pytest.fixture(scope="module")
def gpt2_saiga():
    from impruver.data.templates import SAIGA

    tok = gpt2_tokenizer()
    return tok, encoder_for(tok, SAIGA)


@pytest.fixture(scope="module")
def mistral_zephyr(tmp_path_factory):
    from impruver.data.templates import ZEPHYR

    tok = mistral_tokenizer(tmp_path_factory.mktemp("mistral"))
    return tok, encoder_for(tok, ZEPHYR)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    tok = qwen3_tokenizer(tmp_path_factory.mktemp("qwen3"))
    return tok, encoder_for(tok)


@pytest.mark.parametrize("path,fmt", FILES, ids=[Path(p).parent.name + "/" + Path(p).name for p, _ in FILES])
def test_gpt2_saiga_trains_exactly_the_assistant_turns(gpt2_saiga, path, fmt):
    tok, encoder = gpt2_saiga
    eos = tok.eos_token
    check(tok, encoder, conversations(path, fmt),
          lambda ms, tr: [m["content"] + eos for m, t in zip(ms, tr) if t])


@pytest.mark.parametrize("path,fmt", FILES, ids=[Path(p).parent.name + "/" + Path(p).name for p, _ in FILES])
def test_mistral_zephyr_trains_exactly_the_assistant_turns(mistral_zephyr, path, fmt):
    tok, encoder = mistral_zephyr
    check(tok, encoder, conversations(path, fmt),
          lambda ms, tr: [m["content"] + "</s>" for m, t in zip(ms, tr) if t], limit=300, roundtrip=False)


@pytest.mark.parametrize("path,fmt", FILES, ids=[Path(p).parent.name + "/" + Path(p).name for p, _ in FILES])
def test_qwen3_trains_exactly_the_assistant_turns(qwen3, path, fmt):
    tok, encoder = qwen3
    check(tok, encoder, conversations(path, fmt), qwen3_expected, limit=300)


@pytest.mark.parametrize("template", ["saiga", "chatml"])
def test_builtin_generation_marks_agree_with_prefix_renderings(gpt2_saiga, template):
    """impruver's own templates mark the trained turns; the generic method must find exactly the same spans."""
    from impruver.data.render import Renderer
    from impruver.data.templates import resolve_template

    source = resolve_template(template)
    marked = Renderer.from_template(source, {"bos_token": "<s>", "eos_token": "</s>"})
    generic = Renderer.from_template(source, {"bos_token": "<s>", "eos_token": "</s>"})
    assert marked.generation_marks
    generic.generation_marks = False
    checked = 0
    for path, fmt in FILES:
        for conversation in conversations(path, fmt)[:60]:
            assert marked.text_and_spans(conversation) == generic.text_and_spans(conversation), conversation
            checked += 1
    assert checked > 800


def test_compose_every_real_file_with_a_local_hf_tokenizer(tmp_path, gpt2_saiga):
    """The whole pipeline over every chat, tool and instruct file at once: hf builder from a local folder, every
    record valid, duplicates found across files, and every kept sample trains on assistant text only."""
    from impruver.compose import compose
    from impruver.data import pipeline
    from impruver.plan import DatasetSpec, SourceSpec, make_plan

    tok, _ = gpt2_saiga
    tok.save_pretrained(tmp_path / "gpt2")
    composed = compose(["preset=demo", f"output_dir={tmp_path / 'out'}"])
    plan = make_plan(composed.config, choices=composed.choices)
    sources = {f"s{i}": SourceSpec(path=str(SHARED / path), format=fmt) for i, (path, fmt) in enumerate(FILES)}
    plan = plan.model_copy(update={
        "dataset": DatasetSpec(sources=sources, val_fraction=0.02, max_tokens=1024, length_policy="truncate"),
        "tokenizer": plan.tokenizer.model_copy(update={"builder": "hf", "path": str(tmp_path / "gpt2"),
                                                       "chat_template": "saiga"}),
        "model": plan.model.model_copy(update={"context_length": 1024})})
    result = pipeline.compose(plan)
    report = result.report
    assert all(not row["invalid"] for row in report["sources"].values())
    assert sum(row["duplicates"] for row in report["sources"].values()) > 0  # identity/alpaca copies exist
    assert report["train"]["samples"] > 4000
    eos = tok.eos_token_id
    with result.train_path.open() as handle:
        for n, line in zip(range(2000), handle):
            sample = json.loads(line)
            trained = runs(sample["input_ids"], sample["labels"])
            assert trained and all(run[-1] == eos for run in trained)
            assert not any("<|endoftext|>user\n" in decode(tok, run) for run in trained)
