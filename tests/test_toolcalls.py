"""impruver.toolcalls: the one reader and writer of tool calls (data formats, templates, chat, serve)."""

from __future__ import annotations

import json

import pytest

from impruver import toolcalls


@pytest.mark.parametrize("written", [
    {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},  # OpenAI API
    {"function": {"name": "f", "arguments": {"a": 1}}},
    {"name": "f", "arguments": {"a": 1}},  # LLaMA-Factory, glaive
    {"name": "f", "parameters": {"a": 1}},  # Llama 3
    {"function_call": {"name": "f", "arguments": '{"a": 1}'}},  # the older OpenAI API
])
def test_every_written_shape_reads_as_one_call(written: dict) -> None:
    call = toolcalls.from_openai(written)
    assert call == {"name": "f", "arguments": {"a": 1}}
    assert toolcalls.content_of(call) == '{"name": "f", "arguments": {"a": 1}}'
    assert toolcalls.parse_content(json.dumps(written)) == call


def test_calls_round_trip_through_every_form() -> None:
    call = {"name": "погода", "arguments": {"город": "Москва", "days": [1, 2]}}
    assert toolcalls.parse_content(toolcalls.content_of(call)) == call
    assert toolcalls.from_openai(toolcalls.to_openai(call)) == call
    assert toolcalls.from_openai(toolcalls.to_template(call)) == call
    openai = toolcalls.to_openai(call, call_id="call_1")
    assert openai == {"id": "call_1", "type": "function",
                      "function": {"name": "погода", "arguments": '{"город": "Москва", "days": [1, 2]}'}}
    assert toolcalls.parse_reply(toolcalls.content_of(call)) == call


def test_bad_calls_are_refused_or_kept_as_text() -> None:
    with pytest.raises(toolcalls.ToolCallError, match="without a function name"):
        toolcalls.from_openai({"arguments": {}})
    with pytest.raises(toolcalls.ToolCallError, match="arguments of 'f' are not JSON"):
        toolcalls.from_openai({"name": "f", "arguments": "{oops"})
    assert toolcalls.from_openai({"name": "f", "arguments": "{oops"}, strict=False)["arguments"] == "{oops"
    assert toolcalls.from_openai({"name": "f", "arguments": ""})["arguments"] == {}
    assert toolcalls.parse_content("plain words") is None
    assert toolcalls.parse_content('{"answer": 4}') is None
    assert toolcalls.normal_content('{"name":"f","arguments":"{\\"a\\":1}"}') == '{"name": "f", "arguments": {"a": 1}}'
    assert toolcalls.normal_content("call f with a=1") == "call f with a=1"
    with pytest.raises(toolcalls.ToolCallError):
        toolcalls.normal_content('{"name": "f", "arguments": "{oops"}')


def test_replies_are_calls_only_when_they_say_so() -> None:
    assert toolcalls.parse_reply('function_call\n{"name": "f"}', allow_json=False) == {"name": "f", "arguments": {}}
    assert toolcalls.parse_reply("function_call\nnot json") == {"name": "", "arguments": "not json"}
    assert toolcalls.parse_reply('{"name": "Ivan"}') is None  # a JSON answer, not a call
    assert toolcalls.parse_reply('{"name": "f", "arguments": {}}', allow_json=False) is None


def test_no_other_module_parses_tool_calls_itself() -> None:
    """The homes rule: reading a call's JSON happens in impruver/toolcalls.py only."""
    from pathlib import Path

    root = Path(toolcalls.__file__).parent
    offenders = []
    for path in [*root.glob("data/*.py"), *root.glob("chat/*.py")]:
        text = path.read_text(encoding="utf-8")
        for needle in ('get("arguments"', "get('arguments'", 'function.get("name"'):
            if needle in text:
                offenders.append(f"{path.name}: {needle}")
    assert offenders == []
