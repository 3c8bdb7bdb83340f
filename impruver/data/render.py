"""Rendering conversations with a chat template, and the loss mask: which tokens are trained on.

The ONE rule for trainability: a conversation is rendered once, as a whole, into text; the text is tokenized once
by the fast tokenizer, which maps characters to tokens; a token is trained on when it overlaps a trainable span of
that text. Trainable spans are the assistant and function_call turns as the template writes them (what the
template puts inside the turn, such as Qwen3's empty think block, included) up to and including the turn's
end-of-turn marker. A token straddling a span's edge (the header's "\n" merged with content that starts with
whitespace) is trained.

Spans come from the template itself when it marks them with ``{% generation %}`` (impruver's saiga and chatml
templates do, so they render once). Otherwise, for a trainable
message ``i``: the span starts where ``render(messages[:i], add_generation_prompt=True)`` ends (that text is a
prefix of the whole rendering for every template seen so far; when it is not, at the message's content), and it
ends after the first end-of-turn marker following the content. The marker is learned from the template by
rendering a probe conversation. Tokenizing messages one by one and gluing the pieces is never done: it breaks on
templates that add a BOS once, merge system prompts or change earlier turns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from impruver import toolcalls
from impruver.record import IGNORE_INDEX
from impruver.data.messages import TRAINABLE_ROLES, Conversation, Message, RecordError

_PROBE = "IMPRUVER_PROBE_7f3a"  # content of a probe turn; never in real data
_PROBE_ARG = "impruver_probe_arg"  # an argument name of a probe call
_PROBE_RESULT = "IMPRUVER_PROBE_RESULT_5c1e"  # a probe tool result
_PROBE_TOOL = "impruver_probe_tool"  # the name of a probe function schema


def _probe_call(n: int) -> dict[str, Any]:
    return {"name": f"impruver_probe_fn{n}", "arguments": {_PROBE_ARG: n}}


def _probe_schema() -> dict[str, Any]:
    return {"type": "function", "function": {"name": _PROBE_TOOL, "description": "d", "parameters": {
        "type": "object", "properties": {_PROBE_ARG: {"type": "string"}}, "required": [_PROBE_ARG]}}}


def _groups(messages: list[Message]) -> list[list[Message]]:
    """Canonical messages in runs the templates see as one: an assistant's text with the calls that follow it
    (one OpenAI message with its tool_calls), consecutive calls, consecutive results; any other alone."""
    out: list[list[Message]] = []
    for message in messages:
        role = message["role"]
        previous = out[-1][-1]["role"] if out else None
        joins = (role == toolcalls.CALL_ROLE and previous in ("assistant", toolcalls.CALL_ROLE)
                 and not (previous == "assistant" and message.get("reasoning"))) or \
                (role == toolcalls.RESPONSE_ROLE and previous == toolcalls.RESPONSE_ROLE)
        if joins:
            out[-1].append(message)
        else:
            out.append([message])
    return out


TEXT_WINDOW = 1 << 17  # characters of a long raw text tokenized at once (Encoder.text_ids)
TEXT_MARGIN = 1 << 10  # characters at a window's end whose tokens are left to the next window
TEXT_CHECK = 32  # tokens on which two windows must agree where they meet


@dataclass(frozen=True)
class SourceOptions:
    """The per-source settings rendering needs."""

    only_target_loss: bool = True
    add_bos: bool = False
    add_eos: bool = False
    max_tokens: int = 2048
    length_policy: str = "drop"  # drop | truncate


@dataclass
class Encoded:
    """One sample: token ids, labels (IGNORE_INDEX where not trained) and how many tokens are trained; for the
    report, how many messages the length policy dropped to fit and how many reasoning blocks the template left
    out of the text (Qwen3 writes only the reasoning after the last user turn).

    A chat's ids and labels are lists; a raw text's are int32 arrays (views of its document's ids, labels the very
    same array: every token is trained), so a long document costs 4 bytes a token, not a Python int each."""

    input_ids: list[int] | np.ndarray
    labels: list[int] | np.ndarray
    trainable: int = -1
    dropped_messages: int = 0
    reasoning_dropped: int = 0

    def __post_init__(self) -> None:
        if self.trainable < 0:
            self.trainable = sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class Renderer:
    """A chat template compiled once, with what impruver learned about it by rendering probe conversations.

    Abilities are never read from the template's source (a template may name ``tool_calls`` and ignore them):
    each is a small conversation rendered once, and the ability holds when the probe's marked values come out.
    Where the template cannot carry something it is written the tool-less way, never dropped: calls as JSON
    text in an assistant turn, results as a user turn, schemas in the system text (or the first user turn).
    """

    source: str
    special_tokens: dict[str, str]
    native_roles: bool = False  # knows impruver's function_call / function_response roles by name
    tool_calls: bool = False  # renders an assistant message's OpenAI-style tool_calls (name and arguments)
    parallel_calls: bool = False  # ... several of them in one message
    tool_role: bool = False  # renders a `tool` message (a call's result)
    takes_tools: bool = False  # renders function schemas given as `tools=`
    system_tools: bool = False  # renders schemas given as the system message's `tools` (Phi-4-mini)
    system_role: bool = True  # renders a system message's content
    takes_reasoning: bool = False  # renders an assistant message's reasoning_content
    generation_marks: bool = False  # marks assistant spans with {% generation %} (a syntax, so read from source)
    end_marker: str = ""
    generation_prompt: str = ""  # what add_generation_prompt appends: the assistant turn's header
    _compiled: Any = field(default=None, repr=False)

    @classmethod
    def from_template(cls, source: str, special_tokens: dict[str, str]) -> Renderer:
        renderer = cls(
            source=source,
            special_tokens={k: v for k, v in special_tokens.items() if isinstance(v, str)},
            generation_marks=re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None,
            _compiled=_compile(source),
        )
        renderer._probe_abilities()
        renderer.end_marker = renderer._probe_end_marker()
        renderer.generation_prompt = renderer._probe_generation_prompt()
        return renderer

    def render(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages``."""
        return self._compiled.render(messages=messages, tools=tools, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens)

    # -- probes ------------------------------------------------------------------------------------------------
    def _probe_render(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                      add_generation_prompt: bool = False) -> str:
        """A probe conversation rendered as it is, or after a system turn for templates that need one (some
        read the system prompt unconditionally).

        Raises:
            Exception: whatever the template raises for both.
        """
        try:
            return self.render(messages, tools, add_generation_prompt)
        except Exception:
            if messages and messages[0]["role"] == "system":
                raise
            return self.render([{"role": "system", "content": "s"}, *messages], tools, add_generation_prompt)

    def _shows(self, messages: list[Message], *needles: str, tools: list[dict[str, Any]] | None = None) -> bool:
        """Whether the template renders ``messages`` and every needle comes out."""
        try:
            text = self._probe_render(messages, tools)
        except Exception:  # refused (raise_exception) or broken on this shape: the ability is not there
            return False
        return all(needle in text for needle in needles)

    def _probe_abilities(self) -> None:
        user = {"role": "user", "content": "u"}
        first, second = _probe_call(1), _probe_call(2)
        for content in ("", None):  # templates differ on how a message with only calls holds its content
            calls = {"role": "assistant", "content": content, "tool_calls": [toolcalls.to_template(first)]}
            if self._shows([user, calls], first["name"], _PROBE_ARG):
                self.tool_calls = True
                both = {**calls, "tool_calls": [toolcalls.to_template(first), toolcalls.to_template(second)]}
                self.parallel_calls = self._shows([user, both], first["name"], second["name"])
                self.tool_role = self._shows([user, calls, {"role": "tool", "content": _PROBE_RESULT}],
                                             _PROBE_RESULT)
                break
        call_turn = {"role": toolcalls.CALL_ROLE, "content": toolcalls.content_of(first)}
        result_turn = {"role": toolcalls.RESPONSE_ROLE, "content": _PROBE_RESULT}
        # A template that writes any role's name (`'<|' + role + '|>'`) echoes function_call without knowing it:
        # it knows the roles when it renders them and refuses (or leaves out) a role nobody uses.
        self.native_roles = (self._shows([user, call_turn, result_turn], first["name"], _PROBE_RESULT)
                             and not self._shows([user, {"role": "impruver_probe_role", "content": _PROBE}], _PROBE))
        schema = [_probe_schema()]
        self.takes_tools = self._shows([user], _PROBE_TOOL, tools=schema)
        system = {"role": "system", "content": _PROBE}
        self.system_role = self._shows([system, user], _PROBE)
        if not self.takes_tools:
            listed = {**system, "tools": json.dumps([t["function"] for t in schema], ensure_ascii=False)}
            self.system_tools = self._shows([listed, user], _PROBE_TOOL)
        thought = {"role": "assistant", "content": "a", "reasoning_content": _PROBE}
        self.takes_reasoning = self._shows([user, thought], _PROBE)

    def _probe_end_marker(self) -> str:
        """What the template writes right after an assistant turn's content to end it (``</s>``, ``<|im_end|>``).

        Rendered twice, differing only in what follows the turn: the conversation's end and another user turn.
        Only what both write belongs to the turn, so an EOS the template adds at the conversation's end (Phi-4-mini
        without a generation prompt) or an assistant header it always appends (some Llama-3 exports) is never
        taken for the end of a turn. Of that common text the marker runs to the tokenizer's EOS when the EOS is
        in it (Command-R: ``<|END_RESPONSE|><|END_OF_TURN_TOKEN|>``, the model has to learn to stop), else it is
        the first piece (``<|im_end|>``, ``<end_of_turn>``): what follows is the next turn's opening.
        """
        user, answer = {"role": "user", "content": "u"}, {"role": "assistant", "content": _PROBE}
        afters = []
        for messages in ([user, answer], [user, answer, {"role": "user", "content": "v"}]):
            try:
                text = self._probe_render(messages)
            except Exception:  # a template with stricter rules than the probe: its other rendering decides
                continue
            if _PROBE in text:
                afters.append(text[text.index(_PROBE) + len(_PROBE):])
        if not afters:
            return ""
        common = _piece_boundary(_common_prefix(afters)).lstrip()
        eos = self.special_tokens.get("eos_token", "")
        if eos and eos in common:
            return common[:common.rindex(eos) + len(eos)]
        return _first_piece(common, self.special_tokens)

    def _probe_generation_prompt(self) -> str:
        """What ``add_generation_prompt`` writes: the assistant turn's header. Where the bare rendering ends with
        something the prompted one replaces (a closing EOS), the two part at the last whole piece."""
        probe = [{"role": "user", "content": "u"}]
        try:
            bare, prompted = self._probe_render(probe), self._probe_render(probe, add_generation_prompt=True)
        except Exception:
            return ""
        return prompted[len(_piece_boundary(_common_prefix([bare, prompted]))):]

    # -- conversations -----------------------------------------------------------------------------------------
    def template_messages(self, conversation: Conversation) -> tuple[list[Message], list[bool], list | None]:
        """Canonical messages as this template takes them; which are trainable; the tools argument.

        Calls the template renders as ``tool_calls`` stay one assistant message with all its calls (and the text
        before them) where it renders several; results become ``tool`` messages where it renders those. A
        template that knows neither gets the tool-less convention: one assistant turn holding the text and the
        calls as JSON lines, one user turn holding the results.
        """
        messages: list[Message] = []
        trainable: list[bool] = []
        for group in _groups(conversation["messages"]):
            made = self._template_group(group)
            for k, message in enumerate(made):
                # One message per canonical one: its own flag; merged ones (an answer with its calls) are trained
                # when any part is.
                parts = [group[k]] if len(made) == len(group) else group
                messages.append(message)
                trainable.append(any(m["role"] in TRAINABLE_ROLES and m.get("train", True) for m in parts))
        tools = conversation.get("tools")
        if tools and not self.takes_tools:
            messages, trainable = self._schemas_in_text(messages, trainable, tools)
            tools = None
        return messages, trainable, tools

    def _schemas_in_text(self, messages: list[Message], trainable: list[bool],
                         tools: list[dict[str, Any]]) -> tuple[list[Message], list[bool]]:
        """Function schemas where a template that takes no ``tools=`` still shows them."""
        functions = [t.get("function", t) for t in tools]
        has_system = bool(messages) and messages[0]["role"] == "system"
        if self.system_tools:  # Phi-4-mini: the system message's `tools`, a JSON string
            listed = json.dumps(functions, ensure_ascii=False)
            if has_system:
                return [{**messages[0], "tools": listed}, *messages[1:]], trainable
            return [{"role": "system", "content": "", "tools": listed}, *messages], [False, *trainable]
        listing = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
        text = f"You can call these functions (JSON schemas):\n{listing}"
        if has_system:
            return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]], trainable
        if self.system_role:
            return [{"role": "system", "content": text}, *messages], [False, *trainable]
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first is None:
            raise RecordError("tools_lost", "the template has no system turn and the conversation no user turn "
                                            "to carry the function schemas")
        messages = list(messages)
        messages[first] = {**messages[first], "content": f"{text}\n\n{messages[first]['content']}"}
        return messages, trainable

    def _template_group(self, group: list[Message]) -> list[Message]:
        """One run of canonical messages (see :func:`_groups`) as the template's messages."""
        role = group[-1]["role"]
        if role == toolcalls.CALL_ROLE and not self.native_roles:
            return self._calls(group)
        if role == toolcalls.RESPONSE_ROLE and not self.native_roles:
            if self.tool_calls and self.tool_role:
                return [{"role": "tool", "content": m["content"]} for m in group]
            return [{"role": "user", "content": "\n".join(m["content"] for m in group)}]
        return [self._with_reasoning({"role": m["role"], "content": m["content"]}, m) for m in group]

    def _calls(self, group: list[Message]) -> list[Message]:
        """An assistant's text (when it has some) and its calls: one message where the template can say so."""
        said = group[0] if group[0]["role"] == "assistant" else None
        turns = group[1:] if said is not None else group
        calls = [toolcalls.parse_content(m["content"]) for m in turns]
        content = said["content"] if said is not None else ""
        if self.tool_calls and all(c is not None for c in calls):
            entries = [toolcalls.to_template(c) for c in calls]
            batches = [entries] if self.parallel_calls else [[e] for e in entries]
            out = [{"role": "assistant", "content": content if k == 0 else "", "tool_calls": batch}
                   for k, batch in enumerate(batches)]
        else:  # the tool-less convention: the calls are JSON text the assistant writes after what it says
            out = [{"role": "assistant", "content": "\n".join([*([content] if content else []),
                                                                *(m["content"] for m in turns)])}]
        out[0] = self._with_reasoning(out[0], group[0])
        return out

    def _with_reasoning(self, out: Message, message: Message) -> Message:
        if message.get("reasoning"):
            if self.takes_reasoning:
                out["reasoning_content"] = message["reasoning"]
            else:
                out["content"] = f"<think>\n{message['reasoning']}\n</think>\n\n{out['content']}"
        return out

    def text_and_spans(self, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation rendered once, and the character spans to train on."""
        messages, trainable, tools = self.template_messages(conversation)
        try:
            marked = self._marked_spans(messages, trainable, tools) if self.generation_marks else None
            if marked is not None:
                return marked
            full = self.render(messages, tools)
        except RecordError:
            raise
        except Exception as exc:  # the template's raise_exception() and friends
            raise RecordError("template_error", f"the chat template refused it: {exc}") from None
        spans: list[tuple[int, int]] = []
        position = 0
        for i, train in enumerate(trainable):
            if train:
                start = self._turn_start(full, messages, tools, i, position)
                end = self._turn_end(full, messages, tools, i, start)
                spans.append((start, end))
                position = end
        return full, spans

    def _marked_spans(self, messages: list[Message], trainable: list[bool],
                      tools: Any) -> tuple[str, list[tuple[int, int]]] | None:
        """The spans the template marks with {% generation %}: one per message of the model, of which the
        trainable ones are kept; None when the marks do not pair up with those messages (then the spans are
        found from renderings)."""
        from transformers.utils.chat_template_utils import _render_with_assistant_indices

        text, indices = _render_with_assistant_indices(self._compiled, messages, tools, None, False,
                                                       **self.special_tokens)
        said = [t for m, t in zip(messages, trainable) if m["role"] in TRAINABLE_ROLES]
        if all(trainable[i] == (m["role"] in TRAINABLE_ROLES) for i, m in enumerate(messages)):
            return text, [(int(a), int(b)) for a, b in indices]  # every turn of the model, as marked
        if len(indices) != len(said):
            return None
        return text, [(int(a), int(b)) for (a, b), keep in zip(indices, said) if keep]

    def _turn_start(self, full: str, messages: list[Message], tools: Any, i: int, position: int) -> int:
        try:
            prefix = self.render(messages[:i], tools, add_generation_prompt=True)
        except Exception:
            prefix = None
        if prefix is not None and full.startswith(prefix) and len(prefix) >= position:
            return len(prefix)
        # A generation prompt that opens more than the turn holds (QwQ's "<think>\n" before a turn of calls): the
        # turn starts where the prompted prefix and the whole text part, at a whole marker.
        parted = len(_piece_boundary(_common_prefix([prefix, full]))) if prefix is not None else -1
        if prefix is not None and parted >= max(position, len(prefix) - len(self.generation_prompt)) and \
                not messages[i]["content"]:
            return parted
        # The template rendered earlier turns differently once they were no longer last (Qwen3 drops the
        # reasoning of earlier turns): the turn starts after the next assistant header, else at its content.
        header = self.generation_prompt if messages[i]["role"] == "assistant" else ""
        found = full.find(header, position) if header.strip() else -1
        if found >= 0:
            return found + len(self.generation_prompt)
        found = full.find(messages[i]["content"], position) if messages[i]["content"] else -1
        if found < 0:
            raise RecordError("template_mismatch", f"cannot locate turn {i} in the rendered text")
        return found

    def _turn_end(self, full: str, messages: list[Message], tools: Any, i: int, start: int) -> int:
        """After the turn's content and its end-of-turn marker when the template writes one for this turn.

        The marker must come before the next message: a turn the template closes with nothing (or closes only at
        the conversation's end) ends with its content, never with a later turn's marker. The next message starts
        where the conversation rendered up to this turn parts from the whole one (both differ only in what
        follows the turn: a dangling header or closing EOS of the shorter one is not in the whole one).
        """
        content = messages[i]["content"] or ""
        after = start
        if content:
            found = full.find(content, start)
            after = found + len(content) if found >= 0 else start
        closing = _SPACE.match(full, after).end()  # where the marker starts when it closes this content
        if self.end_marker and content and full.startswith(self.end_marker, closing):
            return closing + len(self.end_marker)  # right after the content: this turn's own (no render needed)
        limit = len(full)
        if i + 1 < len(messages):
            try:
                upto = self.render(messages[: i + 1], tools)
            except Exception:  # a template that refuses to end here: the whole text bounds the search
                upto = ""
            parted = len(_piece_boundary(_common_prefix([upto, full]))) if upto else 0
            if parted > after:  # else the turn itself renders differently when last (Qwen3's think block)
                limit = parted
        eos = self.special_tokens.get("eos_token", "")
        # A turn of calls may close differently from a turn of text (Command-R: <|END_ACTION|> before its EOS):
        # the EOS of the marker then ends it.
        for marker in (self.end_marker, eos if eos and eos in self.end_marker else ""):
            found = full.find(marker, after, limit) if marker else -1
            if found >= 0:
                return found + len(marker)
        return after


def _common_prefix(texts: list[str]) -> str:
    import os.path

    return os.path.commonprefix(texts)


def _piece_boundary(text: str) -> str:
    """``text`` without a trailing part of a marker cut in the middle (``<|im_end|><|`` -> ``<|im_end|>``)."""
    opened, closed = text.rfind("<"), text.rfind(">")
    return text[:opened] if opened > closed else text


_SPACE = re.compile(r"\s*")
_MARKER = re.compile(r"<[^<>\s]{1,60}>|\[/?[A-Za-z_]{2,20}\]")  # <|im_end|>, </s>, <end_of_turn>, [/INST]


def _first_piece(text: str, special_tokens: dict[str, str]) -> str:
    """The first marker of ``text``: a special token, a ``<...>`` or ``[...]`` tag, else its first word."""
    for token in sorted(set(special_tokens.values()), key=len, reverse=True):
        if token and text.startswith(token):
            return token
    found = _MARKER.match(text)
    if found:
        return found.group(0)
    word = re.match(r"\S+", text)
    return word.group(0) if word else ""


def _compile(source: str) -> Any:
    """Compile with the same Jinja environment (sandbox, filters, {% generation %}) as transformers."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(source)


# -- tokens and labels ------------------------------------------------------------------------------------------


def masked_labels(encoding: Any, spans: list[tuple[int, int]]) -> tuple[list[int], int]:
    """Labels of a fast-tokenizer encoding: ids of the tokens overlapping a span, IGNORE_INDEX elsewhere; and
    the number trained. Token ranges come from the encoding's character-to-token map (no offset lists built)."""
    ids = encoding.ids
    labels = [IGNORE_INDEX] * len(ids)
    trained, previous = 0, -1
    for start, end in spans:  # in text order, not overlapping: token ranges can share at most an edge token
        first = encoding.char_to_token(start) if start < end else None
        if first is None:  # a character no token covers (rare): the first one inside the span that is covered
            first = next((t for c in range(start, end) if (t := encoding.char_to_token(c)) is not None), None)
        last = encoding.char_to_token(end - 1) if start < end else None
        if last is None:
            last = next((t for c in range(end - 1, start - 1, -1) if (t := encoding.char_to_token(c)) is not None),
                        None)
        if first is None or last is None:
            continue  # nothing of the span became a token
        first = max(first, previous + 1)
        labels[first:last + 1] = ids[first:last + 1]
        trained += max(0, last + 1 - first)
        previous = max(previous, last)
    return labels, trained


def labels_from_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Token ids where the token overlaps a span, IGNORE_INDEX elsewhere.

    A token that straddles a span's edge (the template's "\n" merged with a content that starts with "\n\n")
    is trained: it is part of what the model has to produce, as with character-to-token masks elsewhere.
    """
    labels = [IGNORE_INDEX] * len(ids)
    if not spans:
        return labels
    k = 0
    for j, (start, end) in enumerate(offsets):
        end = max(end, start + 1)  # zero-width tokens count at their position
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            labels[j] = ids[j]
    return labels


class Encoder:
    """Conversations to samples: render, tokenize in batches with offsets, mask, apply the length policy."""

    def __init__(self, tokenizer: Any, renderer: Renderer) -> None:
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is None:
            raise RecordError("slow_tokenizer", "impruver needs a fast tokenizer (character offsets) for loss "
                                                "masks; give a tokenizer.json or a *Fast tokenizer class")
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id

    def encode_texts(self, texts: list[str]) -> list[Any]:
        """Fast-tokenizer encodings (ids, and character-to-token lookups done in Rust) of ``texts``, batched."""
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def encode(self, conversations: list[Conversation], options: SourceOptions) -> list[list[Encoded] | RecordError]:
        """Each conversation's samples (raw text may give several), or the RecordError that stopped it."""
        results: list[list[Encoded] | RecordError] = [RecordError("internal", "not encoded")] * len(conversations)
        lost: dict[int, int] = {}  # conversation -> reasoning blocks the template left out of its text
        texts, spans, where = [], [], []
        for n, conversation in enumerate(conversations):
            if "text" in conversation and len(conversation["text"]) > 2 * TEXT_WINDOW:
                results[n] = self._chunks(self.text_ids(conversation["text"]), options)  # a long document
                continue
            if "text" in conversation:
                texts.append(conversation["text"])
                spans.append(None)
                where.append(n)
                continue
            try:
                text, found = self.renderer.text_and_spans(conversation)
            except RecordError as exc:
                results[n] = exc
                continue
            texts.append(text)
            spans.append(found)
            where.append(n)
            lost[n] = sum(1 for m in conversation["messages"]
                          if m.get("reasoning") and m["reasoning"].strip() not in text)
        for n, text_spans, encoding in zip(where, spans, self.encode_texts(texts)):
            if text_spans is None:
                results[n] = self._chunks(encoding.ids, options)
            else:
                results[n] = self._fit(conversations[n], encoding, text_spans, options)
                if lost.get(n) and isinstance(results[n], list):
                    results[n][0].reasoning_dropped = lost[n]
        return results

    def text_ids(self, text: str) -> np.ndarray:
        """The ids of a long raw text, exactly as one ``encode`` of it gives them, tokenized in windows of
        TEXT_WINDOW characters: a tokenizer's encoding keeps offsets and token strings (~300 bytes a token, 700 MB
        for a 5 MB document), a window's only a few MB. The ids are kept as int32 arrays, one per window, joined
        once at the end ((tokens,) int32: 4 bytes a token; a list of Python ints costs ~36).

        Each window is cut before a token that starts at whitespace at least TEXT_MARGIN characters before the
        window's end (far from where the window's own end could change the tokens); the next window starts
        there, and its first TEXT_CHECK tokens must equal the tokens the previous window had from that point on.
        Where they do not (a tokenizer whose pieces depend on where the text starts), the text is tokenized whole.
        """
        whole = len(text)
        out: list[np.ndarray] = []  # (window tokens,) int32 each
        expected: list[int] = []  # the previous window's tokens from the cut on
        position = 0
        while True:
            window = text[position:position + TEXT_WINDOW]
            encoding = self.encode_texts([window])[0]
            ids = encoding.ids
            if expected and ids[:len(expected)] != expected:
                return self._whole_ids(text)  # not splittable here: exact, whole
            if position + len(window) >= whole:
                out.append(np.array(ids, dtype=np.int32))
                return np.concatenate(out)
            offsets = encoding.offsets
            cut = self._cut(window, offsets, len(window) - TEXT_MARGIN)
            if cut is None:
                return self._whole_ids(text)
            out.append(np.array(ids[:cut], dtype=np.int32))
            expected = ids[cut:cut + TEXT_CHECK]
            position += offsets[cut][0]

    def _whole_ids(self, text: str) -> np.ndarray:
        """One encode of the whole text, as int32."""
        return np.array(self.encode_texts([text])[0].ids, dtype=np.int32)

    @staticmethod
    def _cut(window: str, offsets: list[tuple[int, int]], limit: int) -> int | None:
        """The last token (index > 0) that starts at or after whitespace, at or before character ``limit``."""
        for k in range(len(offsets) - 1, 0, -1):
            start = offsets[k][0]
            if 0 < start <= limit and (window[start].isspace() or window[start - 1].isspace()):
                return k
        return None

    def _sample(self, encoding: Any, spans: list[tuple[int, int]], options: SourceOptions,
                last_trainable: bool) -> Encoded:
        ids = encoding.ids
        if not options.only_target_loss:
            labels, trained = list(ids), len(ids)
        else:
            labels, trained = masked_labels(encoding, spans)
        if options.add_bos:
            if self.bos_id is None:
                raise RecordError("no_bos_token", "add_bos is set but the tokenizer has no bos_token")
            if not self._has_at_edge(ids, self.bos_id, range(len(ids))):
                ids, labels = [self.bos_id, *ids], [IGNORE_INDEX, *labels]
        if options.add_eos:
            if self.eos_id is None:
                raise RecordError("no_eos_token", "add_eos is set but the tokenizer has no eos_token")
            # A template ending "EOS\n" has closed the text already: a second EOS would be trained after it.
            if not self._has_at_edge(ids, self.eos_id, range(len(ids) - 1, -1, -1)):
                # The closing EOS belongs to the last turn: trained when that turn is.
                train_eos = not options.only_target_loss or last_trainable
                ids, labels = [*ids, self.eos_id], [*labels, self.eos_id if train_eos else IGNORE_INDEX]
                trained += int(train_eos)
        return Encoded(ids, labels, trained)

    def _has_at_edge(self, ids: list[int], token: int, order: range) -> bool:
        """Whether ``token`` is the first id met from one end of ``ids`` (in ``order``) past whitespace tokens."""
        for k in order:
            if ids[k] == token:
                return True
            if self.tokenizer.decode([ids[k]]).strip():
                return False
        return False

    def _fit(self, conversation: Conversation, encoding: Any, spans: list[tuple[int, int]],
             options: SourceOptions) -> list[Encoded] | RecordError:
        original = conversation
        try:
            last = conversation["messages"][-1]
            last_trainable = last["role"] in TRAINABLE_ROLES and last.get("train", True)
            sample = self._sample(encoding, spans, options, last_trainable)
            while len(sample.input_ids) > options.max_tokens:
                if options.length_policy != "truncate":
                    return RecordError("too_long", f"{len(sample.input_ids)} tokens > {options.max_tokens}")
                shorter = drop_first_exchange(conversation)
                if shorter is None:
                    return RecordError("too_long", f"{len(sample.input_ids)} tokens > {options.max_tokens} even "
                                                   "with only the last exchange")
                conversation = shorter
                text, spans = self.renderer.text_and_spans(conversation)
                sample = self._sample(self.encode_texts([text])[0], spans, options, last_trainable)
        except RecordError as exc:
            return exc
        if sample.trainable == 0:
            return RecordError("no_trainable_tokens", "no token left to train on")
        sample.dropped_messages = len(original["messages"]) - len(conversation["messages"])
        return [sample]

    def _chunks(self, ids: list[int] | np.ndarray, options: SourceOptions) -> list[Encoded] | RecordError:
        """Raw text: all tokens trained, an EOS closing the document, cut into max_tokens pieces. The pieces are
        int32 views of one array (the document's ids, BOS before each piece where asked), each piece its own
        labels: no per-token Python objects, whatever the document's length."""
        bos = self.bos_id if options.add_bos and self.bos_id is not None else None
        eos = [] if self.eos_id is None else [self.eos_id]
        ids = np.concatenate([np.asarray(ids, dtype=np.int32), np.array(eos, dtype=np.int32)])  # (tokens,)
        room = options.max_tokens - (bos is not None)
        if bos is not None:  # a BOS column before each row of room tokens, then the rows read back in order
            starts = np.arange(0, len(ids), room)
            ids = np.insert(ids, starts, bos)
            room += 1
        out = []
        for start in range(0, len(ids), room):
            piece = ids[start:start + room]
            if len(piece) > 1:
                out.append(Encoded(piece, piece, len(piece)))
        return out or RecordError("empty_text", "no tokens")


def drop_first_exchange(conversation: Conversation) -> Conversation | None:
    """The conversation without its first non-system exchange (up to the next user turn), or None when only the
    last exchange is left (the last assistant turn is always kept)."""
    messages = conversation["messages"]
    first = 1 if messages and messages[0]["role"] == "system" else 0
    users = [i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"]
    if not users:
        return None
    rest = messages[users[0]:]
    if not any(m["role"] in TRAINABLE_ROLES for m in rest):
        return None
    return {**conversation, "messages": messages[:first] + rest}
