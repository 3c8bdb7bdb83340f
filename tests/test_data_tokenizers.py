"""Tokenizer builders (hf, bpe) and the plan's tokenizer with its chat template attached."""

from __future__ import annotations

import pytest

from impruver.data.templates import SAIGA, resolve_template
from impruver.data.tokenizers import bpe_tokenizer, build_tokenizer, hf_tokenizer
from impruver.errors import ConfigError, RunError
from impruver.plan import TokenizerSpec

TEXTS = ["Привет, как дела?", "Hello there, how are you?", "Всё хорошо, спасибо!"] * 50


def test_bpe_special_tokens_save_and_reload(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer(TokenizerSpec(builder="bpe", vocab_size=300, min_frequency=2, chat_template="saiga"),
                          texts=iter(TEXTS))
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert len(tok) <= 300 and tok.chat_template == SAIGA
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "<s>user\nПривет, как дела?</s>\n"
    assert again(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert again.decode(again(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    assert again.chat_template == SAIGA


def test_bpe_is_deterministic():
    a = bpe_tokenizer(texts=iter(TEXTS), vocab_size=300, min_frequency=2)
    b = bpe_tokenizer(texts=iter(TEXTS), vocab_size=300, min_frequency=2)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_hf_local_folder_special_tokens_and_template_file(tmp_path):
    bpe_tokenizer(texts=iter(TEXTS), vocab_size=300, min_frequency=2).save_pretrained(tmp_path / "local")
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok = build_tokenizer(TokenizerSpec(builder="hf", path=str(tmp_path / "local"),
                                        chat_template=str(tmp_path / "t.jinja"),
                                        special_tokens={"pad_token": "<mypad>"}))
    assert tok.chat_template.startswith("{% for m in messages %}")
    assert tok.pad_token == "<mypad>" and tok.pad_token_id == len(tok) - 1


def test_hub_id_offline_fails_at_once_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RunError, match=r"ai-forever/rugpt3small_based_on_gpt2' is a Hugging Face Hub tokenizer id "
                                       r".*tokenizer.path=DIR"):
        hf_tokenizer(path="ai-forever/rugpt3small_based_on_gpt2")


def test_templates_by_name_file_or_source_and_errors(tmp_path):
    assert resolve_template("saiga") == SAIGA
    assert resolve_template("{{ messages }}") == "{{ messages }}"
    with pytest.raises(ConfigError, match="unknown template 'saigaa'; did you mean 'saiga'"):
        resolve_template("saigaa")
    with pytest.raises(ConfigError, match="no template file"):
        resolve_template(str(tmp_path / "missing.jinja"))


def test_no_template_anywhere_is_a_config_error(tmp_path):
    bpe_tokenizer(texts=iter(TEXTS), vocab_size=300, min_frequency=2).save_pretrained(tmp_path / "plain")
    with pytest.raises(ConfigError, match="has no chat template"):
        build_tokenizer(TokenizerSpec(builder="hf", path=str(tmp_path / "plain")))
    with pytest.raises(ConfigError, match="cannot import"):
        build_tokenizer(TokenizerSpec(builder="hf", path=str(tmp_path / "plain"), class_path="nowhere.at_all:Tok",
                                      chat_template="saiga"))
