"""The survey: every real chat template of ../shared/data (166 Hub models) renders a fixed set of conversations,
and what impruver trains is checked against what the rendered text itself says, independently of how impruver
found its spans.

For each template and conversation the outcome is one of:
* ok: exactly the assistant turns are trained, each with the same end-of-turn after its content;
* refused: the template raised on the conversation (its own reason, e.g. "roles must alternate"), which
  composition counts as an invalid record;
* wrong: anything else. The table is printed; the test fails on any wrong.

Character spans are what token labels are made from (``masked_labels`` maps them to tokens, tested elsewhere), so
the check is at the character level: fast, and independent of any tokenizer.
"""

from __future__ import annotations

import json
import os.path
import re
from collections import Counter

import pytest

from data_helpers import SHARED, needs_shared
from impruver.data.messages import RecordError
from impruver.data.render import Renderer

pytestmark = needs_shared

TEMPLATES = SHARED / "tokenizers/chat_templates/chat_templates_166_models.json"
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
U1, U2, S1, R1 = "Quokka question one", "Wombat question two", "Be brief, kind system", "Rainy and nine degrees"
A1, A2 = "Koala answer one", "Platypus answer two"
CONVERSATIONS = {
    "plain": {"messages": [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}]},
    "multi": {"messages": [{"role": "user", "content": U1}, {"role": "assistant", "content": A1},
                           {"role": "user", "content": U2}, {"role": "assistant", "content": A2}]},
    "system": {"messages": [{"role": "system", "content": S1}, {"role": "user", "content": U1},
                            {"role": "assistant", "content": A1}, {"role": "user", "content": U2},
                            {"role": "assistant", "content": A2}]},
    "tools": {"messages": [{"role": "user", "content": U1},
                           {"role": "function_call", "content": json.dumps(CALL)},
                           {"role": "function_response", "content": R1},
                           {"role": "assistant", "content": A2}], "tools": TOOLS},
}
HEARD = (U1, U2, S1, R1)  # what is never trained


def renderers(entry: dict) -> dict[str, Renderer] | str:
    """The template (for conversations without and with tools), or why it cannot be used at all."""
    specials = {k: v for k, v in entry.items() if isinstance(v, str) and k != "chat_template"}
    source = entry["chat_template"]
    sources = {"default": source, "tools": source} if isinstance(source, str) else \
        {"default": source.get("default") or next(iter(source.values())),
         "tools": source.get("tool_use") or source.get("default") or next(iter(source.values()))}
    try:
        return {k: Renderer.from_template(v, specials) for k, v in sources.items()}
    except Exception as exc:  # Jinja syntax this environment cannot compile
        return f"does not compile: {type(exc).__name__}"


def check(renderer: Renderer, conversation: dict) -> tuple[str, str]:
    """(outcome, detail) of one conversation through one template."""
    try:
        text, spans = renderer.text_and_spans(conversation)
    except RecordError as exc:
        if exc.reason == "template_error":
            return "refused", exc.detail
        return "wrong", f"{exc.reason}: {exc.detail}"
    messages, trainable, _ = renderer.template_messages(conversation)
    said = [m for m, t in zip(messages, trainable) if t]
    if len(spans) != len(said):
        return "wrong", f"{len(spans)} spans for {len(said)} assistant turns"
    if any(b <= a for a, b in spans) or any(spans[k][1] > spans[k + 1][0] for k in range(len(spans) - 1)):
        return "wrong", f"empty or overlapping spans {spans}"
    trained = [text[a:b] for a, b in spans]
    for span in trained:
        heard = [h for h in HEARD if h in span]
        if heard:
            return "wrong", f"a trained span holds {heard[0]!r}: {span!r}"
    tails = []
    for message, span in zip(said, trained):
        content = message.get("content") or ""
        for call in message.get("tool_calls") or []:  # a call's name and arguments are trained
            if call["function"]["name"] not in span or "Paris" not in span:
                return "wrong", f"call {call['function']['name']} is not trained: {span!r}"
        key = content if content else CALL["name"]
        if key not in span:
            return "wrong", f"turn {key!r} is not trained: {span!r}"
        if content:
            tails.append(span[span.rindex(content) + len(content):])
            before = re.sub(r"<think>.*?</think>", "", span[:span.index(content)], flags=re.S)
            if before.strip() and _prompts_the_header(renderer, conversation):
                return "wrong", f"a header the generation prompt writes is trained: {before!r}"
    if len(set(tails)) > 1:  # one end-of-turn per template: a dangling header or closing EOS is not part of it
        return "wrong", f"different end-of-turn texts {sorted(set(tails))}"
    missing = _untrained_end(renderer, text, trained, said)
    if missing:
        return "wrong", f"the end-of-turn {missing!r} that follows every turn is not trained"
    if conversation.get("tools") and "get_weather" not in text:
        return "wrong", "the function schemas are not in the text"
    return "ok", ""


def _prompts_the_header(renderer: Renderer, conversation: dict) -> bool:
    """Whether add_generation_prompt writes anything after this conversation's first exchange. When it does not,
    the assistant header is part of what the template writes for the turn (the model has to write it), and is
    trained with the turn."""
    messages, _, tools = renderer.template_messages(conversation)
    first = next(i for i, m in enumerate(messages) if m["role"] == "user") + 1
    try:
        return renderer.render(messages[:first], tools, True) != renderer.render(messages[:first], tools, False)
    except Exception:
        return True


def _untrained_end(renderer: Renderer, text: str, trained: list[str], said: list[dict]) -> str:
    """What the template writes after every assistant content in this text (up to the next content, at a whole
    marker) when the trained spans stop before it; '' when nothing is missed."""
    contents = [m["content"] for m in said if m.get("content")]
    if len(contents) < 2:  # a last turn alone cannot tell its end-of-turn from the conversation's end
        return ""
    afters, position = [], 0
    for content in contents:
        at = text.index(content, position) + len(content)
        nxt = min([i for i in (text.find(h, at) for h in (*HEARD, *contents)) if i > at] or [len(text)])
        afters.append(text[at:nxt])
        position = at
    common = os.path.commonprefix(afters).strip()
    eos = renderer.special_tokens.get("eos_token")
    if eos and eos in common:  # the model has to learn to stop: everything up to the EOS is the turn's
        wanted = common[:common.rindex(eos) + len(eos)]
    else:
        marker = re.match(r"<[^<>\s]{1,60}>|</s>", common)
        if not marker:
            return ""
        wanted = marker.group(0)
    tails = {span[span.rindex(c) + len(c):] for span, c in zip(trained, contents) if c in span}
    return "" if all(tail.strip().startswith(wanted) for tail in tails) else wanted


@pytest.mark.skipif(not TEMPLATES.is_file(), reason=f"{TEMPLATES} is absent")
def test_every_real_template_trains_exactly_the_assistant_turns(capsys):
    entries = json.loads(TEMPLATES.read_text())
    table: dict[str, dict[str, str]] = {}
    details: list[str] = []
    for model, entry in sorted(entries.items()):
        found = renderers(entry)
        if isinstance(found, str):
            table[model] = {name: "refused" for name in CONVERSATIONS}
            details.append(f"{model}: refused: {found}")
            continue
        table[model] = {}
        for name, conversation in CONVERSATIONS.items():
            outcome, detail = check(found["tools" if conversation.get("tools") else "default"], conversation)
            table[model][name] = outcome
            if outcome != "ok":
                details.append(f"{model} / {name}: {outcome}: {detail[:200]}")
    templates = Counter("wrong" if "wrong" in row.values() else "ok" if set(row.values()) == {"ok"} else "refused"
                        for row in table.values())
    cells = Counter(outcome for row in table.values() for outcome in row.values())
    with capsys.disabled():
        print(f"\ntemplate survey over {len(table)} templates x {len(CONVERSATIONS)} conversations")
        print(f"templates: ok {templates['ok']}, refused some {templates['refused']}, wrong {templates['wrong']}")
        print(f"conversations: ok {cells['ok']}, refused {cells['refused']}, wrong {cells['wrong']}")
        for name in CONVERSATIONS:
            column = Counter(row[name] for row in table.values())
            print(f"  {name:7s} ok {column['ok']:3d}  refused {column['refused']:3d}  wrong {column['wrong']:3d}")
        for line in details:
            if ": wrong:" in line or os.environ.get("IMPRUVER_SURVEY_VERBOSE"):
                print("  " + line)
    assert cells["wrong"] == 0, [line for line in details if ": wrong:" in line]
    assert cells["ok"] > 400  # most real templates carry every conversation
