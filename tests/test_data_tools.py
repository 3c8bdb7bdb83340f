"""Tool calls through real templates: abilities learned by rendering, parallel calls kept in one message, and the
tool-less convention where a template cannot carry calls or schemas (nothing dropped)."""

from __future__ import annotations

import json

import pytest

from data_helpers import SHARED, needs_shared, qwen3_tokenizer, runs
from impruver.data import formats as F
from impruver.data.render import Renderer, SourceOptions

pytestmark = needs_shared

TEMPLATES = SHARED / "tokenizers/chat_templates/chat_templates_166_models.json"
GLAIVE = SHARED / "function_calling/llamafactory_glaive_toolcall_en_demo.json"
MISTRAL_V1 = SHARED / "tokenizers/mistral_7b_v1_zephyr/mistral_v1_spm_chat_template.jinja"


def hub_renderer(model: str) -> Renderer:
    entry = json.loads(TEMPLATES.read_text())[model]
    return Renderer.from_template(entry["chat_template"], {k: v for k, v in entry.items() if isinstance(v, str)})


def glaive() -> list[dict]:
    return [c for record in json.loads(GLAIVE.read_text()) for c in F.sharegpt(record)]


def test_parallel_calls_stay_one_message_and_equal_apply_chat_template(tmp_path):
    """mistral-common's parallel_calls sample through Qwen3: the ids are exactly apply_chat_template's."""
    from data_helpers import encoder_for

    sample = json.loads((SHARED / "function_calling/mistral_common_samples/parallel_calls/sample.json").read_text())
    tok = qwen3_tokenizer(tmp_path / "qwen3")
    encoder = encoder_for(tok)
    assert encoder.renderer.tool_calls and encoder.renderer.parallel_calls and encoder.renderer.tool_role
    (conversation,) = F.openai(sample)
    ((encoded,),) = encoder.encode([conversation], SourceOptions(max_tokens=4096))
    reference = tok.apply_chat_template(sample["messages"], tools=sample["tools"], tokenize=True,
                                        return_dict=True)["input_ids"]
    assert encoded.input_ids == list(reference)
    trained = [tok.decode(r) for r in runs(encoded.input_ids, encoded.labels)]
    assert len(trained) == 3  # call, answer, and the two calls of the last turn in one run
    assert trained[2].count("<tool_call>") == 2 and trained[2].endswith("</tool_call><|im_end|>")
    assert "<|im_start|>assistant" not in trained[2]


def test_a_template_that_names_tool_calls_but_never_renders_them_gets_calls_as_text():
    """Mistral v1 mentions tool_calls and refuses the tool role: every glaive conversation is kept, its calls as
    JSON text in trained assistant turns and its results as user turns; 0 calls lost."""
    renderer = Renderer.from_template(MISTRAL_V1.read_text(), {"bos_token": "<s>", "eos_token": "</s>"})
    assert not renderer.tool_calls and not renderer.native_roles and not renderer.takes_tools
    conversations = glaive()
    assert len(conversations) == 300
    calls = lost = 0
    for conversation in conversations:
        text, spans = renderer.text_and_spans(conversation)  # raises on a refusal: none may happen
        trained = [text[a:b] for a, b in spans]
        for message in conversation["messages"]:
            if message["role"] == "function_call":
                calls += 1
                lost += not any(message["content"] in t for t in trained)
            if message["role"] == "function_response":
                assert not any(message["content"] in t for t in trained)
        for tool in conversation["tools"] or []:
            assert json.dumps(tool["function"], ensure_ascii=False) in text
    assert calls > 150 and lost == 0


def test_phi4_mini_keeps_the_schemas_in_its_system_tools():
    renderer = hub_renderer("microsoft/Phi-4-mini-instruct")
    assert renderer.system_tools and not renderer.takes_tools
    with_tools = [c for c in glaive() if c["tools"]]
    assert len(with_tools) > 30
    for conversation in with_tools:
        text, _ = renderer.text_and_spans(conversation)
        listed = text[text.index("<|tool|>") + len("<|tool|>"):text.index("<|/tool|>")]
        assert json.loads(listed) == [t["function"] for t in conversation["tools"]]


@pytest.mark.parametrize("model", ["Qwen/Qwen2.5-3B-Instruct", "deepseek-ai/DeepSeek-V3-Base",
                                   "deepseek-ai/DeepSeek-R1", "THUDM/glm-4-9b-chat"])
def test_calls_and_schemas_reach_the_hub_templates(model):
    """Templates the issue found losing calls (DeepSeek-V3) or schemas (glm-4): each call's name and arguments are
    in a trained span, each schema's name in the text."""
    names = json.loads(TEMPLATES.read_text())
    if model not in names:
        pytest.skip(f"{model} is not among the surveyed templates")
    renderer = hub_renderer(model)
    for conversation in glaive()[:60]:
        try:
            text, spans = renderer.text_and_spans(conversation)
        except Exception as exc:  # the template's own refusal is allowed, never a silent loss
            assert "refused" in str(exc)
            continue
        trained = "".join(text[a:b] for a, b in spans)
        for message in conversation["messages"]:
            if message["role"] == "function_call":
                call = json.loads(message["content"])
                assert call["name"] in trained
                for key in call["arguments"]:
                    assert key in trained
        for tool in conversation["tools"] or []:
            assert tool["function"]["name"] in text
