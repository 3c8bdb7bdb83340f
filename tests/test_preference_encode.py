"""Pairs through the SFT encoder: only the answers are trained, both sides share the prompt tokens, lengths are
limited per pair; golden counts on the real LLaMA-Factory sharegpt demo (read in place) with the GPT-2 tokenizer."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from data_helpers import SHARED, encoder_for, gpt2_tokenizer, needs_shared

from impruver.data.messages import RecordError
from impruver.data.preference import encode_labelled, encode_pair, sharegpt_preference, trl_kto, trl_preference
from impruver.data.render import SourceOptions
from impruver.data.templates import CHATML
from impruver.record import IGNORE_INDEX

pytestmark = needs_shared


@pytest.fixture(scope="module")
def tok() -> Any:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def enc(tok: Any) -> Any:
    return encoder_for(tok, CHATML)


def trained(sample: dict[str, list[int]]) -> list[int]:
    return [t for t in sample["labels"] if t != IGNORE_INDEX]


def test_only_the_answers_are_trained_and_the_prompt_is_shared(tok: Any, enc: Any) -> None:
    pair = trl_preference({"prompt": "2+2?", "chosen": "4", "rejected": "five", "system": "Be brief."})[0]
    out = encode_pair(enc, pair, SourceOptions())
    n = out["prompt_tokens"]
    assert tok.decode(out["chosen"]["input_ids"][:n]) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>"
                                                          "user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert out["chosen"]["input_ids"][:n] == out["rejected"]["input_ids"][:n]
    assert tok.decode(trained(out["chosen"])) == "4<|im_end|>"
    assert tok.decode(trained(out["rejected"])) == "five<|im_end|>"
    assert set(out["chosen"]["labels"][:n]) == {IGNORE_INDEX}


def test_prompt_tokens_that_merge_with_the_answers_fail_the_record(tok: Any) -> None:
    bare = ('{% for m in messages %}{% if m.role == "assistant" %}{% generation %}{{ m.content }}{% endgeneration %}'
            '{% else %}{{ m.content }}{% endif %}{% endfor %}')
    pair = trl_preference({"prompt": "Hell", "chosen": "o world", "rejected": ", world"})[0]
    result = encode_pair(encoder_for(tok, bare), pair, SourceOptions())
    assert isinstance(result, RecordError) and result.reason == "prompt_tokens_differ"


def test_lengths_are_limited_per_pair(tok: Any, enc: Any) -> None:
    history = [{"role": "user", "content": "tell me a long story " * 20},
               {"role": "assistant", "content": "once upon a time " * 20},
               {"role": "user", "content": "and the end?"}]
    pair = trl_preference({"prompt": history, "chosen": "they lived happily", "rejected": "no"})[0]
    whole = encode_pair(enc, pair, SourceOptions(max_tokens=4096))
    assert not isinstance(whole, RecordError)
    limit = len(whole["chosen"]["input_ids"]) - 1
    dropped = encode_pair(enc, pair, SourceOptions(max_tokens=limit))
    assert isinstance(dropped, RecordError) and dropped.reason == "too_long"
    cut = encode_pair(enc, pair, SourceOptions(max_tokens=limit, length_policy="truncate"))
    assert not isinstance(cut, RecordError)
    # both sides lost the same first exchange: the prompt is now the last question only, on each side
    n = cut["prompt_tokens"]
    assert cut["chosen"]["input_ids"][:n] == cut["rejected"]["input_ids"][:n]
    last_question = "<|im_start|>user\nand the end?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(cut["chosen"]["input_ids"][:n]) == last_question
    assert tok.decode(trained(cut["rejected"])) == "no<|im_end|>"


def test_labelled_record(tok: Any, enc: Any) -> None:
    out = encode_labelled(enc, trl_kto({"prompt": "2+2?", "completion": "4", "label": True})[0], SourceOptions())
    assert out["label"] is True and tok.decode(trained(out["completion"])) == "4<|im_end|>"


@pytest.mark.parametrize(("policy", "counts", "tokens"), [
    ("drop", {"ok": 194, "too_long": 106}, 169314),
    ("truncate", {"ok": 284, "too_long": 16}, 300575),
])
def test_llamafactory_sharegpt_demo_golden_counts(enc: Any, policy: str, counts: dict[str, int],
                                                  tokens: int) -> None:
    rows = json.loads((SHARED / "preference" / "llamafactory_dpo_en_demo.json").read_text(encoding="utf-8"))
    options = SourceOptions(max_tokens=1024, length_policy=policy)
    seen: Counter[str] = Counter()
    total = 0
    for row in rows:
        out = encode_pair(enc, sharegpt_preference(row)[0], options)
        if isinstance(out, RecordError):
            seen[out.reason] += 1
            continue
        seen["ok"] += 1
        total += len(out["chosen"]["input_ids"]) + len(out["rejected"]["input_ids"])
        assert max(len(out["chosen"]["input_ids"]), len(out["rejected"]["input_ids"])) <= 1024
    assert seen == counts
    assert total == tokens
