"""Rendering and loss masks: exact ids against references, agreement with {% generation %}, length policy."""

from __future__ import annotations

import json


from data_helpers import SHARED, encoder_for, mistral_tokenizer, needs_shared, qwen3_tokenizer, runs, word_tokenizer
from impruver.data import formats as F
from impruver.data.render import Renderer, SourceOptions, labels_from_spans
from impruver.data.templates import CHATML, SAIGA

X = -100
W = ["system", "user", "bot", "assistant", "a", "b", "c", "d", "e", "f", "default"]
CONV = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"},
                     {"role": "user", "content": "d"}, {"role": "assistant", "content": "e f"}]}


def encode(encoder, conversation, **options):
    (result,) = encoder.encode([conversation], SourceOptions(**{"max_tokens": 100, **options}))
    return result


@needs_shared
def test_mistral_v1_renders_exactly_the_reference_ids(tmp_path):
    """mistral_common_samples/no_tools through impruver (openai format, v1 template file) == tokens_v1.json."""
    from impruver.data.templates import resolve_template

    sample = SHARED / "function_calling/mistral_common_samples/no_tools"
    tok = mistral_tokenizer(tmp_path / "mistral")
    template = resolve_template(str(SHARED / "tokenizers/mistral_7b_v1_zephyr/mistral_v1_spm_chat_template.jinja"))
    encoder = encoder_for(tok, template)
    (conversation,) = F.openai(json.loads((sample / "sample.json").read_text()))
    (encoded,) = encode(encoder, conversation, max_tokens=4096)
    assert encoded.input_ids == json.loads((sample / "tokens_v1.json").read_text())["tokens"]
    trained = [tok.decode(r) for r in runs(encoded.input_ids, encoded.labels)]
    assert trained == ["The result of 5 + 5 is 10.</s>", "The square root of 64 is 8, because 8 x 8 equals 64.</s>",
                       "Sure! The result of 10 x 8 is 80.</s>"]


GENERATION_CHATML = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_mask_agrees_with_generation_markers():
    tok = word_tokenizer(W, specials=("<s>", "</s>", "<|im_start|>", "<|im_end|>"))
    marked = encoder_for(tok, GENERATION_CHATML)
    assert marked.renderer.generation_marks
    generic = encoder_for(tok, GENERATION_CHATML)
    generic.renderer.generation_marks = False  # force impruver's own span finding on the same template
    a, b = encode(marked, CONV)[0], encode(generic, CONV)[0]
    assert a.input_ids == b.input_ids and a.labels == b.labels
    # And what transformers itself reports as the assistant mask agrees too.
    hf = tok.apply_chat_template(CONV["messages"], chat_template=GENERATION_CHATML, tokenize=True,
                                 return_dict=True, return_assistant_tokens_mask=True)
    assert hf["input_ids"] == a.input_ids
    assert [int(label != X) for label in a.labels] == list(hf["assistant_masks"])


def test_labels_come_from_one_rendering_with_bos_once_and_a_default_system_prompt():
    # A template that writes BOS once and injects a default system prompt: per-message gluing gets this wrong.
    template = ("{{ bos_token }}{% if messages[0]['role'] != 'system' %}system\ndefault\n{% endif %}"
                "{% for m in messages %}{{ m['role'] }}\n{{ m['content'] }}{{ eos_token if m['role'] == 'assistant' "
                "else '' }}\n{% endfor %}{% if add_generation_prompt %}assistant\n{% endif %}")
    tok = word_tokenizer(W)
    (sample,) = encode(encoder_for(tok, template), CONV)
    assert tok.convert_ids_to_tokens(sample.input_ids) == [
        "<s>", "system", "\n", "default", "\n", "user", "\n", "a", "\n", "assistant", "\n", "b", "c", "</s>", "\n",
        "user", "\n", "d", "\n", "assistant", "\n", "e", "f", "</s>", "\n"]
    assert [tok.convert_ids_to_tokens(r) for r in runs(sample.input_ids, sample.labels)] == [
        ["b", "c", "</s>"], ["e", "f", "</s>"]]


@needs_shared
def test_qwen3_empty_think_block_is_trained_with_the_last_turn(tmp_path):
    tok = qwen3_tokenizer(tmp_path / "qwen")
    (sample,) = encode(encoder_for(tok), {"messages": [
        {"role": "user", "content": "Привет"}, {"role": "assistant", "content": "Здравствуйте"},
        {"role": "user", "content": "Как дела?"}, {"role": "assistant", "content": "Хорошо"}]})
    assert [tok.decode(r) for r in runs(sample.input_ids, sample.labels)] == [
        "Здравствуйте<|im_end|>", "<think>\n\n</think>\n\nХорошо<|im_end|>"]


def test_only_target_loss_false_trains_everything():
    (sample,) = encode(encoder_for(word_tokenizer(W), SAIGA), CONV, only_target_loss=False)
    assert sample.labels == sample.input_ids


def test_add_bos_and_add_eos_work_when_they_trigger():
    # The users' recipes crashed whenever the global BOS/EOS was actually added.
    tok = word_tokenizer(W)
    template = "{% for m in messages %}{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    (sample,) = encode(encoder_for(tok, template), CONV, add_bos=True, add_eos=True)
    assert sample.input_ids[0] == tok.bos_token_id and sample.labels[0] == X
    assert sample.input_ids[-1] == tok.eos_token_id and sample.labels[-1] == tok.eos_token_id  # closes the answer
    (again,) = encode(encoder_for(tok, SAIGA), CONV, add_bos=True)  # already starts with <s>: not doubled
    assert again.input_ids[:2] != [tok.bos_token_id, tok.bos_token_id]


def test_length_policy_drop_and_truncate():
    encoder = encoder_for(word_tokenizer(W), SAIGA)
    full = encode(encoder, CONV)[0].input_ids  # 2 exchanges
    too_long = encode(encoder, CONV, max_tokens=len(full) - 1)
    assert too_long.reason == "too_long"  # counted by compose, never silent
    (cut,) = encode(encoder, CONV, max_tokens=len(full) - 1, length_policy="truncate")
    tok = encoder.tokenizer
    assert tok.convert_ids_to_tokens(cut.input_ids) == ["<s>", "user", "\n", "d", "</s>", "\n", "<s>", "bot", "\n",
                                                       "e", "f", "</s>", "\n"]  # the last exchange is kept
    assert encode(encoder, CONV, max_tokens=5, length_policy="truncate").reason == "too_long"


def test_tools_go_into_the_system_turn_of_templates_without_tools():
    renderer = Renderer.from_template(SAIGA, {"bos_token": "<s>", "eos_token": "</s>"})
    conversation = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                    "tools": [{"type": "function", "function": {"name": "add", "parameters": {}}}]}
    messages, trainable, tools = renderer.template_messages(conversation)
    assert tools is None and trainable == [False, False, True]
    assert messages[0]["role"] == "system" and '{"name": "add", "parameters": {}}' in messages[0]["content"]


def test_function_turns_in_templates_without_tool_support():
    from impruver.data.templates import ZEPHYR

    renderer = Renderer.from_template(ZEPHYR, {"bos_token": "<s>", "eos_token": "</s>"})
    conversation = {"messages": [{"role": "user", "content": "a"}, {"role": "function_call", "content": '{"name": "f"}'},
                                 {"role": "function_response", "content": "1"}, {"role": "assistant", "content": "b"}]}
    text, spans = renderer.text_and_spans(conversation)
    assert [text[a:b] for a, b in spans] == ['{"name": "f"}</s>', "b</s>"]
    assert "<|user|>\n1</s>" in text  # the tool's answer is something the assistant hears, never trained on


def test_saiga_template_shape():
    renderer = Renderer.from_template(SAIGA, {"bos_token": "<s>", "eos_token": "</s>"})
    text, spans = renderer.text_and_spans({"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
        {"role": "function_call", "content": "{}"}, {"role": "function_response", "content": "r"}]})
    assert text == "<s>system\ns</s>\n<s>user\nu</s>\n<s>bot\na</s>\n<s>function_call\n{}</s>\n<s>function_response\nr</s>\n"
    assert [text[a:b] for a, b in spans] == ["a</s>", "{}</s>"]
    assert renderer.render([{"role": "user", "content": "u"}], add_generation_prompt=True).endswith("<s>bot\n")
    chatml = Renderer.from_template(CHATML, {})
    assert chatml.end_marker == "<|im_end|>" and chatml.generation_prompt == "<|im_start|>assistant\n"


def test_labels_from_spans_edges():
    offsets = [(0, 3), (3, 5), (5, 8), (8, 9)]
    assert labels_from_spans([10, 11, 12, 13], offsets, [(3, 8)]) == [X, 11, 12, X]
    assert labels_from_spans([10, 11, 12, 13], offsets, [(4, 8)]) == [X, 11, 12, X]  # straddling token: trained
    assert labels_from_spans([10, 11, 12, 13], offsets, []) == [X, X, X, X]
