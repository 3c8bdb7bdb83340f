"""Helpers for the data tests: tiny tokenizers built in code, the real tokenizers of ../shared/data, encoding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data folder {SHARED} is absent")


def word_tokenizer(words: list[str], *, template: str | None = None, specials: tuple[str, ...] = ("<s>", "</s>")):
    """A WordLevel tokenizer over ``words`` (split on whitespace, newline a token of its own) built in code.

    Ids: <unk>=0, then specials, then "\\n", then ``words`` in order.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    for token in [*specials, "\n", *words]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
    ])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token=specials[0],
                                  eos_token=specials[1], pad_token=specials[1])
    tok.add_special_tokens({"additional_special_tokens": list(specials[2:])} if specials[2:] else {})
    if template:
        tok.chat_template = template
    return tok


def gpt2_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(SHARED / "tokenizers/gpt2/tokenizer.json"),
                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def mistral_tokenizer(folder: Path):
    pytest.importorskip("sentencepiece", reason="reading the Mistral tokenizer.model needs sentencepiece")
    pytest.importorskip("google.protobuf", reason="reading the Mistral tokenizer.model needs protobuf")
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHARED / "tokenizers/mistral_7b_v1_zephyr/tokenizer.model", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": False, "legacy": True}))
    return AutoTokenizer.from_pretrained(folder)


def qwen3_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(SHARED / "tokenizers/qwen2" / name, folder / name)
    shutil.copy(SHARED / "tokenizers/qwen2/qwen3_30b_tokenizer_config.json", folder / "tokenizer_config.json")
    return AutoTokenizer.from_pretrained(folder)


def encoder_for(tokenizer: Any, template: str | None = None):
    """An Encoder for ``tokenizer`` with ``template`` (default: its own chat template)."""
    from impruver.data.render import Encoder, Renderer
    from impruver.data.tokenizers import special_tokens_of

    source = template or tokenizer.chat_template
    return Encoder(tokenizer, Renderer.from_template(source, special_tokens_of(tokenizer)))


def runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Consecutive trained tokens, one list per run."""
    out: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels):
        if label != -100:
            if not previous:
                out.append([])
            out[-1].append(token)
        previous = label != -100
    return out
