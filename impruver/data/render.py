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

from impruver import toolcalls
from impruver.record import IGNORE_INDEX
from impruver.data.messages import TRAINABLE_ROLES, Conversation, Message, RecordError

_PROBE = "IMPRUVER_PROBE_7f3a"  # content of a probe turn; never in real data


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
    """One sample: token ids, labels (IGNORE_INDEX where not trained) and how many tokens are trained."""

    input_ids: list[int]
    labels: list[int]
    trainable: int = -1

    def __post_init__(self) -> None:
        if self.trainable < 0:
            self.trainable = sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class Renderer:
    """A chat template compiled once, with what impruver learned about it."""

    source: str
    special_tokens: dict[str, str]
    native_roles: bool = False  # renders function_call / function_response as they are
    tool_calls: bool = False  # takes OpenAI-style tool_calls and the tool role
    takes_tools: bool = False  # reads `tools` (function schemas)
    takes_reasoning: bool = False  # reads reasoning_content
    generation_marks: bool = False  # marks assistant spans with {% generation %}
    end_marker: str = ""
    generation_prompt: str = ""  # what add_generation_prompt appends: the assistant turn's header
    _compiled: Any = field(default=None, repr=False)

    @classmethod
    def from_template(cls, source: str, special_tokens: dict[str, str]) -> Renderer:
        renderer = cls(
            source=source,
            special_tokens={k: v for k, v in special_tokens.items() if isinstance(v, str)},
            native_roles="function_call" in source,
            tool_calls="tool_calls" in source,
            takes_tools=re.search(r"\btools\b", source) is not None,
            takes_reasoning="reasoning_content" in source,
            generation_marks=re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None,
            _compiled=_compile(source),
        )
        renderer.end_marker = renderer._probe_end_marker()
        renderer.generation_prompt = renderer._probe_generation_prompt()
        return renderer

    def render(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages``."""
        return self._compiled.render(messages=messages, tools=tools, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def _probe_end_marker(self) -> str:
        """What the template writes right after an assistant turn's content (``</s>``, ``<|im_end|>``...)."""
        try:
            text = self.render([{"role": "user", "content": "u"}, {"role": "assistant", "content": _PROBE}])
        except Exception:  # a template with stricter rules than the probe: fall back to turn boundaries
            return ""
        found = re.match(r"\s*(\S+)", text[text.find(_PROBE) + len(_PROBE):]) if _PROBE in text else None
        return found.group(1) if found else ""

    def _probe_generation_prompt(self) -> str:
        probe = [{"role": "user", "content": "u"}]
        try:
            bare, prompted = self.render(probe), self.render(probe, add_generation_prompt=True)
        except Exception:
            return ""
        return prompted[len(bare):] if prompted.startswith(bare) else ""

    # -- conversations -----------------------------------------------------------------------------------------
    def template_messages(self, conversation: Conversation) -> tuple[list[Message], list[bool], list | None]:
        """Canonical messages as this template takes them; which are trainable; the tools argument."""
        messages, trainable = [], []
        for message in conversation["messages"]:
            messages.append(self._template_message(message))
            trainable.append(message["role"] in TRAINABLE_ROLES)
        tools = conversation.get("tools")
        if tools and not self.takes_tools:
            listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
            text = f"You can call these functions (JSON schemas):\n{listing}"
            if messages and messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
            else:
                messages.insert(0, {"role": "system", "content": text})
                trainable.insert(0, False)
            tools = None
        return messages, trainable, tools

    def _template_message(self, message: Message) -> Message:
        role, content = message["role"], message["content"]
        out: Message = {"role": role, "content": content}
        if role in ("function_call", "function_response") and not self.native_roles:
            call = toolcalls.parse_content(content) if role == "function_call" and self.tool_calls else None
            if call is not None:
                out = {"role": "assistant", "content": "", "tool_calls": [toolcalls.to_template(call)]}
            elif role == "function_response" and self.tool_calls:
                out = {"role": "tool", "content": content}
            else:  # a template without tools: a call is something the assistant says, a result something it hears
                out = {"role": "assistant" if role == "function_call" else "user", "content": content}
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
            if self.generation_marks:
                return self._marked_spans(messages, tools)
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
                end = self._turn_end(full, messages, i, start)
                spans.append((start, end))
                position = end
        return full, spans

    def _marked_spans(self, messages: list[Message], tools: Any) -> tuple[str, list[tuple[int, int]]]:
        from transformers.utils.chat_template_utils import _render_with_assistant_indices

        text, indices = _render_with_assistant_indices(self._compiled, messages, tools, None, False,
                                                       **self.special_tokens)
        return text, [(int(a), int(b)) for a, b in indices]

    def _turn_start(self, full: str, messages: list[Message], tools: Any, i: int, position: int) -> int:
        try:
            prefix = self.render(messages[:i], tools, add_generation_prompt=True)
        except Exception:
            prefix = None
        if prefix is not None and full.startswith(prefix) and len(prefix) >= position:
            return len(prefix)
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

    def _turn_end(self, full: str, messages: list[Message], i: int, start: int) -> int:
        content = messages[i]["content"]
        after = start
        if content:
            found = full.find(content, start)
            after = found + len(content) if found >= 0 else start
        if self.end_marker:
            found = full.find(self.end_marker, after)
            if found >= 0:
                return found + len(self.end_marker)
        try:
            upto = self.render(messages[: i + 1])
        except Exception:
            upto = ""
        return len(upto.rstrip()) if upto and full.startswith(upto) else len(full)


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
        texts, spans, where = [], [], []
        for n, conversation in enumerate(conversations):
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
        for n, text_spans, encoding in zip(where, spans, self.encode_texts(texts)):
            if text_spans is None:
                results[n] = self._chunks(encoding.ids, options)
            else:
                results[n] = self._fit(conversations[n], encoding, text_spans, options)
        return results

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
            if not ids or ids[0] != self.bos_id:
                ids, labels = [self.bos_id, *ids], [IGNORE_INDEX, *labels]
        if options.add_eos:
            if self.eos_id is None:
                raise RecordError("no_eos_token", "add_eos is set but the tokenizer has no eos_token")
            if not ids or ids[-1] != self.eos_id:
                # The closing EOS belongs to the last turn: trained when that turn is.
                train_eos = not options.only_target_loss or last_trainable
                ids, labels = [*ids, self.eos_id], [*labels, self.eos_id if train_eos else IGNORE_INDEX]
                trained += int(train_eos)
        return Encoded(ids, labels, trained)

    def _fit(self, conversation: Conversation, encoding: Any, spans: list[tuple[int, int]],
             options: SourceOptions) -> list[Encoded] | RecordError:
        try:
            last_trainable = conversation["messages"][-1]["role"] in TRAINABLE_ROLES
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
        return [sample]

    def _chunks(self, ids: list[int], options: SourceOptions) -> list[Encoded] | RecordError:
        """Raw text: all tokens trained, an EOS closing the document, cut into max_tokens pieces."""
        ids = list(ids) + ([self.eos_id] if self.eos_id is not None else [])
        room = options.max_tokens - (1 if options.add_bos and self.bos_id is not None else 0)
        out = []
        for start in range(0, len(ids), room):
            piece = ids[start:start + room]
            if options.add_bos and self.bos_id is not None:
                piece = [self.bos_id, *piece]
            if len(piece) > 1:
                out.append(Encoded(piece, list(piece)))
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
