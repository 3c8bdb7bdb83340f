"""What a run leaves serves as it is: ``model.generate`` stops at the end of the first reply, the chat template
renders with plain Jinja2, the KV cache is back on, the tokenizer loads under a portable class, and the card
carries real metadata (checked with huggingface_hub's own card parser).

One tiny GPT-2 is trained once for the module on ChatML conversations with a ``</s>`` EOS (the case the issue
names: the template ends a turn with ``<|im_end|>``, which is not the EOS).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train_support import make_tokenizer, write_jsonl

from impruver.data.templates import CHATML, SAIGA, ZEPHYR
from impruver.plan import make_plan

CHATS = [("What is two plus two?", "Four."), ("Capital of France?", "Paris."), ("Привет!", "Здравствуйте!")]
CHAT = {"do_sample": False, "max_new_tokens": 40, "repetition_penalty": 1.0}
TAG = re.compile(r"\{%-?\s*(end)?generation\b")  # transformers' training-only tags
ARCH = {"family": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 128, "vocab_size": 400}


def _plan(out: Path, **model: Any) -> Any:
    return make_plan({
        "output_dir": str(out), "seed": 3,
        "model": {"builder": "arch", "arch": ARCH, "weights": "random", "dtype": "float32", "context_length": 128,
                  **model},
        "tokenizer": {"builder": "hf", "path": str(out / "tok"), "chat_template": "chatml"},
        "dataset": {"sources": {"demo": {"path": "unused.jsonl", "format": "openai"}}, "max_tokens": 128},
        "method": {"builder": "scratch"},
        "hardware": {"name": "cpu", "device": "cpu"},
        "train": {"batch_size": 4, "lr": 1e-2, "max_steps": 80, "scheduler": "constant", "eval_steps": 1000,
                  "save_steps": 1000,
                  "logging_steps": 20, "warmup_steps": 2, "seed": 3},
        "chat": CHAT,
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """(output_dir, plan, the training tokenizer): ChatML chats on a byte-level BPE whose EOS is ``</s>``."""
    from transformers import AutoTokenizer

    import impruver.data.pipeline as pipeline
    from impruver.train.recipe import run

    out = tmp_path_factory.mktemp("ready") / "run"
    tok = make_tokenizer(out / "tok", vocab_size=360)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(out / "tok")
    rows = []
    for question, answer in CHATS * 12:
        ids = tok.apply_chat_template([{"role": "user", "content": question},
                                       {"role": "assistant", "content": answer}], tokenize=True,
                                      return_dict=True)["input_ids"]
        rows.append({"input_ids": ids, "labels": ids})
    write_jsonl(out / "data" / "train.jsonl", rows)
    plan = _plan(out)
    with pytest.MonkeyPatch.context() as mp:  # read the files written here instead of composing
        mp.setattr(pipeline, "ensure_composed", lambda plan, **_: None)
        mp.setattr(pipeline, "load_composed_tokenizer", lambda plan: AutoTokenizer.from_pretrained(plan.tokenizer.path))
        run(plan)
    return out, plan, tok


def test_generate_stops_at_the_end_of_the_first_reply(trained) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = trained
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end != tok.eos_token_id  # the case that never stopped: </s> is the EOS, the turn ends with <|im_end|>
    question, answer = CHATS[0]
    inputs = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        reply = model.generate(**inputs)[0, inputs["input_ids"].shape[1]:].tolist()
        # The same call with the EOS alone (what generation_config.json held before) runs on into a new turn.
        runaway = model.generate(**inputs, eos_token_id=tok.eos_token_id)[0, inputs["input_ids"].shape[1]:].tolist()
    assert reply[-1] == end and len(reply) < CHAT["max_new_tokens"], tok.decode(reply)
    assert tok.decode(reply[:-1]) == answer
    assert len(runaway) == CHAT["max_new_tokens"] and "<|im_start|>" in tok.decode(runaway)


def test_generation_config_holds_the_stop_ids_and_the_chat_settings(trained) -> None:
    out, plan, tok = trained
    config = json.loads((out / "generation_config.json").read_text())
    stops = config["eos_token_id"]
    assert set(stops) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    assert stops[0] == tok.eos_token_id
    assert config["pad_token_id"] == tok.pad_token_id
    assert {k: config.get(k, False if k == "do_sample" else None) for k in CHAT} == CHAT


def test_sampling_defaults_come_from_the_chat_section(tmp_path: Path) -> None:
    from transformers import GenerationConfig

    from impruver.train.outputs import write_generation_config

    tok = make_tokenizer(tmp_path / "tok")
    plan = _plan(tmp_path).model_copy(update={"chat": _plan(tmp_path).chat.model_copy(update={
        "do_sample": True, "temperature": 0.3, "top_p": 0.8, "top_k": 7, "max_new_tokens": 99})})
    write_generation_config(tmp_path, model=None, tokenizer=tok, plan=plan)
    config = GenerationConfig.from_pretrained(tmp_path)
    assert (config.do_sample, config.temperature, config.top_p, config.top_k, config.max_new_tokens) == \
        (True, 0.3, 0.8, 7, 99)
    assert config.eos_token_id == tok.eos_token_id  # saiga ends a turn with the EOS itself: one stop id


def test_saved_template_renders_with_plain_jinja_as_transformers_renders_the_training_one(trained) -> None:
    import jinja2

    out, _, tok = trained
    text = (out / "chat_template.jinja").read_text()
    assert not TAG.search(text) and TAG.search(tok.chat_template)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Как дела?"}]
    special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token}
    for messages, prompt in ((conversation, True), (conversation[:3], False)):
        plain = jinja2.Environment().from_string(text).render(messages=messages, add_generation_prompt=prompt,
                                                              **special)
        assert plain == tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
    # training keeps the tags: the composed tokenizer's own template is untouched
    assert "{%- generation %}" in (out / "tok" / "chat_template.jinja").read_text()


# Indented blocks, blank lines after block tags and a comment: what trim_blocks / lstrip_blocks act on.
LAYOUT = """{# a comment line #}
{% for message in messages %}

    {% if message['role'] == 'user' %}
  [U] {{ message['content'] }}
    {% else %}
{% generation %}  [A] {{ message['content'] }}{{ eos_token }}
{% endgeneration %}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}  [A]{% endif %}"""


@pytest.mark.parametrize("template", [SAIGA, CHATML, ZEPHYR, LAYOUT], ids=["saiga", "chatml", "zephyr", "layout"])
def test_portable_template_renders_alike_in_both_environments(tmp_path: Path, template: str) -> None:
    """The rewrite renders in plain Jinja2 what transformers renders from the original, and transformers renders
    it the same too (zephyr and the layout above rely on trim_blocks / lstrip_blocks; the rewrite does not)."""
    import jinja2

    from impruver.data.templates import portable_template

    tok = make_tokenizer(tmp_path / "tok")
    portable = portable_template(template)
    assert not TAG.search(portable)
    conversations = [[{"role": "user", "content": "u1"}],
                     [{"role": "system", "content": "s"}, {"role": "user", "content": "u1\n"},
                      {"role": "assistant", "content": " a1 "}, {"role": "user", "content": "u2"}]]
    differs = False
    for messages in conversations:
        for prompt in (False, True):
            tok.chat_template = template
            expected = tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            tok.chat_template = portable
            assert tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False) == expected
            variables = {"messages": messages, "add_generation_prompt": prompt, "bos_token": "<s>", "eos_token": "</s>"}
            assert jinja2.Environment().from_string(portable).render(**variables) == expected
            if not TAG.search(template):  # the original in plain Jinja2 (which refuses the generation tag)
                differs |= jinja2.Environment().from_string(template).render(**variables) != expected
    assert differs == (template is ZEPHYR)  # where the settings matter, the rewrite is what makes them agree


def test_config_has_the_cache_on_and_gpt2_its_n_ctx(trained) -> None:
    out, _, _ = trained
    config = json.loads((out / "config.json").read_text())
    assert config["use_cache"] is True
    assert config["n_ctx"] == config["n_positions"] == ARCH["n_positions"]


def test_tokenizer_config_names_a_class_transformers_4_57_knows(trained) -> None:
    out, _, _ = trained
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not {"is_local", "local_files_only"} & set(config)


def test_card_carries_metadata_the_plan_and_the_final_metrics(trained) -> None:
    from huggingface_hub import ModelCard

    out, plan, _ = trained
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    assert card.data.base_model is None  # trained from scratch here: no base to name
    summary = json.loads((out / "run.json").read_text())
    assert f"| train_loss | {summary['train_loss']:.4f} |" in card.text
    assert f"```yaml\n{plan.to_yaml().rstrip()}\n```" in card.text


def test_card_names_hub_bases_and_datasets_and_redacts_secrets(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from impruver.train.outputs import write_card

    plan = make_plan({
        "output_dir": str(tmp_path / "run"),
        "model": {"builder": "hf", "path": "ai-forever/rugpt3small_based_on_gpt2", "license": "mit",
                  "language": ["ru"]},
        "tokenizer": {"builder": "auto", "chat_template": "saiga"},
        "dataset": {"sources": {"a": {"path": "IlyaGusev/ru_turbo_saiga", "format": "openai"},
                                "b": {"path": str(tmp_path / "local.jsonl"), "format": "openai"}}},
        "method": {"builder": "lora"},
        "hardware": {"name": "cpu", "device": "cpu", "options": {"api_key": "sk-secret-value"}},
    })
    path = write_card(plan, {"steps": 3, "train_loss": 1.5}, folder=tmp_path)
    card = ModelCard.load(path)
    assert card.data.base_model == "ai-forever/rugpt3small_based_on_gpt2"
    assert card.data.datasets == ["IlyaGusev/ru_turbo_saiga"]
    assert (card.data.license, card.data.language, card.data.library_name) == ("mit", ["ru"], "peft")
    assert "sk-secret-value" not in path.read_text()


def test_an_adapter_names_its_base_portably(tmp_path: Path) -> None:
    from impruver.train.outputs import base_reference

    def plan(path: str) -> Any:
        return make_plan({"output_dir": str(tmp_path / "run"), "model": {"builder": "hf", "path": path},
                          "tokenizer": {"builder": "auto", "chat_template": "saiga"},
                          "dataset": {"sources": {"a": {"path": "x.jsonl", "format": "openai"}}},
                          "method": {"builder": "lora"}, "hardware": {"name": "cpu", "device": "cpu"}})

    assert base_reference(plan("org/model")) == "org/model"
    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert base_reference(plan(str(snapshot))) == "org/cached"  # a Hub-cache copy is the Hub id
    local = tmp_path / "my-base"
    local.mkdir()
    assert base_reference(plan(str(local))) == str(local.resolve())
