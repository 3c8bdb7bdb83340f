"""Streaming, stopping, token-based history trimming and function-call parsing (shared by chat and serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_chat_support import TEMPLATE, build_tokenizer, chat_dirs, chat_plan, direct_reply  # noqa: F401, F811

from impruver.chat.generate import Generation, fit, generation_kwargs, parse_function_call, render
from impruver.chat.load import load
from impruver.plan import ChatSpec

HELLO = [{"role": "user", "content": "Привет"}]


@pytest.fixture(scope="module")
def loaded(chat_dirs: dict[str, Path]) -> Any:
    return load(chat_plan(chat_dirs["full"]))


def test_reply_streams_piece_by_piece_and_adds_up_to_the_reply(loaded: Any) -> None:
    ids = render(loaded.tokenizer, HELLO)
    reply = Generation(loaded.model, loaded.tokenizer, ids, generation_kwargs(ChatSpec(do_sample=False,
                                                                                         max_new_tokens=24)))
    pieces = list(reply)
    assert len(pieces) >= 10  # about one piece per token (a multi-byte character may take two)
    assert "".join(pieces).strip() == reply.text == direct_reply(loaded.model, loaded.tokenizer, HELLO)
    assert reply.prompt_tokens == len(ids) and reply.completion_tokens == 24


def test_stop_ends_a_long_reply_early(loaded: Any) -> None:
    kwargs = generation_kwargs(ChatSpec(do_sample=False, max_new_tokens=1500))
    reply = Generation(loaded.model, loaded.tokenizer, render(loaded.tokenizer, HELLO), kwargs)
    stream = iter(reply)
    first = [next(stream) for _ in range(3)]
    reply.stop()
    assert reply.finish_reason == "interrupted" and reply.completion_tokens < 1500
    assert reply.text.startswith("".join(first).strip())


def test_stop_strings_end_the_reply_before_them(loaded: Any) -> None:
    full = direct_reply(loaded.model, loaded.tokenizer, HELLO, max_new_tokens=24)
    start = next(i for i in range(4, len(full) - 2) if "\ufffd" not in full[i:i + 2] and full[i:i + 2].strip())
    stop = full[start:start + 2]  # whole characters: a stop string is matched on text, not on broken bytes
    kwargs = generation_kwargs(ChatSpec(do_sample=False, max_new_tokens=24))
    reply = Generation(loaded.model, loaded.tokenizer, render(loaded.tokenizer, HELLO), kwargs, stop_strings=[stop])
    assert reply.wait() == full[:full.index(stop)].strip()
    assert reply.finish_reason == "stop" and reply.completion_tokens < 24


def test_fit_forgets_the_oldest_exchanges_by_tokens_and_keeps_the_system_prompt() -> None:
    tok = build_tokenizer()
    system = {"role": "system", "content": "Ты — Сайга."}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": f"answer {i}"}]
    turns.append({"role": "user", "content": "last question"})
    whole = len(render(tok, [system, *turns]))
    budget = whole - 1  # one token too many: the oldest exchange (2 messages) goes
    messages = [system, *turns]
    ids, dropped = fit(tok, messages, budget)
    assert dropped == 2 and messages[0] == system and messages[1:] == turns[2:]
    assert ids == render(tok, messages) and len(ids) <= budget

    messages = [system, *turns]
    tail = render(tok, [system, turns[-1]])
    ids, dropped = fit(tok, messages, len(tail))  # room for the last question only
    assert dropped == 12 and messages == [system, turns[-1]] and ids == tail

    ids, _ = fit(tok, messages, 5)  # not even that: its last tokens (the reply header) are kept
    assert ids == tail[-5:]


def test_generation_kwargs_pass_sampling_settings_only_when_sampling() -> None:
    assert generation_kwargs(ChatSpec(do_sample=False, max_new_tokens=7)) == {
        "max_new_tokens": 7, "do_sample": False, "repetition_penalty": 1.1}
    sampled = generation_kwargs(ChatSpec(temperature=0.3, top_p=0.8, top_k=20))
    assert sampled == {"max_new_tokens": 256, "do_sample": True, "repetition_penalty": 1.1, "temperature": 0.3,
                       "top_p": 0.8, "top_k": 20}
    assert generation_kwargs(ChatSpec(), temperature=0)["do_sample"] is False  # OpenAI's temperature 0: greedy
    assert generation_kwargs(ChatSpec(), max_new_tokens=3, top_p=0.5)["top_p"] == 0.5


@pytest.mark.parametrize(("text", "allow_json", "expected"), [
    ('function_call\n{"name": "get_weather", "arguments": {"city": "Moscow"}}', False,
     {"name": "get_weather", "arguments": {"city": "Moscow"}}),
    ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Moscow\\"}"}', True,
     {"name": "get_weather", "arguments": {"city": "Moscow"}}),
    ('{"function_call": {"name": "f", "parameters": {}}}', True, {"name": "f", "arguments": {}}),
    ('{"name": "get_weather", "arguments": {}}', False, None),
    ('{"name": "Ivan"}', True, None),  # a JSON answer that is not a call
    ("Привет! Чем помочь?", True, None),
    ("[1, 2]", True, None),
])
def test_parse_function_call(text: str, allow_json: bool, expected: Any) -> None:
    assert parse_function_call(text, allow_json=allow_json) == expected


def test_render_maps_function_turns_and_tools_onto_the_template_as_training_does() -> None:
    tok = build_tokenizer()
    call = '{"name": "get_weather", "arguments": {"city": "Moscow"}}'
    turns = [{"role": "user", "content": "Погода?"}, {"role": "function_call", "content": call},
             {"role": "function_response", "content": '{"temp": 21}'}]

    def text(ids: list[int]) -> str:
        return tok.decode(ids)

    # TEMPLATE writes any role's name as it is: it echoes function_call without knowing it, so a call is what
    # the assistant says and a result what it hears (whatever its source says in comments).
    assert text(render(tok, turns)) == (f"<s>user\nПогода?</s>\n<s>bot\n{call}</s>\n"
                                        '<s>user\n{"temp": 21}</s>\n<s>bot\n')
    from impruver.data.templates import SAIGA  # knows the function roles (and refuses others): keeps them

    tok.chat_template = SAIGA
    assert text(render(tok, turns)) == (f"<s>user\nПогода?</s>\n<s>function_call\n{call}</s>\n"
                                        '<s>function_response\n{"temp": 21}</s>\n<s>bot\n')
    tok.chat_template = TEMPLATE
    tools = [{"name": "get_weather", "parameters": {"type": "object"}}]
    rendered = text(render(tok, turns[:1], tools=tools))  # a template that never reads `tools`
    assert rendered.startswith("<s>system\nYou can call these functions (JSON schemas):\n"
                               '{"name": "get_weather", "parameters": {"type": "object"}}</s>\n<s>user\n')
    assert render(tok, turns[:1]) == tok.apply_chat_template(turns[:1], add_generation_prompt=True)["input_ids"]


def test_the_templates_end_of_turn_ends_a_reply_when_it_is_not_eos() -> None:
    from impruver.chat.generate import _end_of_turn_text, eos_ids
    from impruver.data.templates import CHATML

    tok = build_tokenizer()
    assert eos_ids(None, tok) == [tok.eos_token_id] and _end_of_turn_text(tok) == []  # saiga-style: </s> is EOS
    tok.chat_template = CHATML
    assert eos_ids(None, tok) == [tok.eos_token_id] and _end_of_turn_text(tok) == ["<|im_end|>"]  # plain text
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert eos_ids(None, tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    assert _end_of_turn_text(tok) == []


def test_named_templates_pick_tool_use_for_requests_with_tools() -> None:
    tok = build_tokenizer()
    tool_use = ("{% for m in messages %}[{{ m['role'] }}|{{ tools | tojson if tools else '' }}]{{ m['content'] }}"
                "{% endfor %}")
    tok.chat_template = {"default": TEMPLATE, "tool_use": tool_use}
    hello = [{"role": "user", "content": "hi"}]
    assert tok.decode(render(tok, hello)) == "<s>user\nhi</s>\n<s>bot\n"
    assert tok.decode(render(tok, hello, tools=[{"name": "f"}])) == '[user|[{"name": "f"}]]hi'
