"""Compose without torch: the tokenizer that compose, its workers and the planning load is AutoTokenizer's own
choice, loaded without importing torch (about 190 MB a process), and a whole compose with worker processes never
imports it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_helpers import SHARED, gpt2_tokenizer, mistral_tokenizer, needs_shared, qwen3_tokenizer, word_tokenizer
from impruver.data.tokenizers import _plain_tokenizer_class, load_pretrained, save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Hello world, how are you?\n\nПривет, мир! Как дела?", "  leading spaces\tand tabs\n",
         "def f(x):\n    return x ** 2  # code", "<|im_start|>user\nhi<|im_end|>\n<s>[INST] a [/INST]</s><|endoftext|>"]


def _same(loaded, reference) -> None:
    """The same class, vocabulary, special tokens, template and ids (with and without special tokens)."""
    assert type(loaded) is type(reference)
    assert len(loaded) == len(reference) and loaded.get_vocab() == reference.get_vocab()
    assert loaded.special_tokens_map == reference.special_tokens_map
    assert loaded.chat_template == reference.chat_template
    for text in TEXTS:
        for special in (False, True):
            assert loaded.encode(text, add_special_tokens=special) == \
                reference.encode(text, add_special_tokens=special)


@needs_shared
@pytest.mark.parametrize("name", ["gpt2", "words", "qwen3", "qwen3_saved"])
def test_a_plain_tokenizer_folder_loads_as_autotokenizer_loads_it(name: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = tmp_path / name
    if name == "gpt2":
        gpt2_tokenizer().save_pretrained(folder)
    elif name == "words":
        save_tokenizer(word_tokenizer(["hello", "world"], template="{{ messages[0]['content'] }}"), folder)
    elif name == "qwen3":
        qwen3_tokenizer(folder)  # vocab.json + merges.txt + a Qwen2Tokenizer config, no tokenizer.json
    else:
        save_tokenizer(qwen3_tokenizer(tmp_path / "q"), folder)
    assert _plain_tokenizer_class(folder) is not None  # taken without AutoTokenizer
    _same(load_pretrained(folder), AutoTokenizer.from_pretrained(folder))


@needs_shared
def test_folders_whose_class_autotokenizer_may_change_go_through_autotokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    mistral = tmp_path / "mistral"
    mistral_tokenizer(mistral)  # LlamaTokenizer: AutoTokenizer swaps it for byte-level files
    assert _plain_tokenizer_class(mistral) is None
    _same(load_pretrained(mistral), AutoTokenizer.from_pretrained(mistral))
    model = tmp_path / "model"  # a model folder: its model_type may override the tokenizer's class
    gpt2_tokenizer().save_pretrained(model)
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert _plain_tokenizer_class(model) is None
    remote = tmp_path / "remote"
    gpt2_tokenizer().save_pretrained(remote)
    config = json.loads((remote / "tokenizer_config.json").read_text())
    (remote / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": ["a.B", None]}}))
    assert _plain_tokenizer_class(remote) is None
    assert _plain_tokenizer_class(tmp_path / "absent") is None and _plain_tokenizer_class("org/name") is None


_COMPOSE = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from impruver.data import convert, pipeline
from impruver.plan import DatasetSpec, SourceSpec
from test_train_support import tiny_plan

seen = Path({seen!r})
process_chunk = convert.process_chunk

def recorded(task):  # in each worker (forked: it inherits this patch): was torch imported there?
    result = process_chunk(task)
    with seen.open("a") as out:
        out.write(json.dumps([os.getpid(), "torch" in sys.modules]) + "\\n")
    return result

convert.process_chunk = recorded
pipeline.CHUNK = 40  # several chunks: the worker pool runs
plan = tiny_plan(Path({out!r}), tokenizer_path={tokenizer!r})
dataset = DatasetSpec(sources={{"chats": SourceSpec(path={data!r}, format="openai")}}, val_size=5, num_proc=2)
result = pipeline.compose(plan.model_copy(update={{"dataset": dataset}}), force=True)
print(json.dumps({{"samples": result.report["train"]["samples"], "torch": "torch" in sys.modules,
                  "transformers_auto": "transformers.models.auto.tokenization_auto" in sys.modules}}))
"""


@needs_shared
def test_a_compose_with_workers_imports_no_torch(tmp_path: Path) -> None:
    gpt2_tokenizer().save_pretrained(tmp_path / "gpt2")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]}) + "\n" for i in range(300)), encoding="utf-8")
    seen = tmp_path / "seen.jsonl"
    code = _COMPOSE.format(tests=str(ROOT / "tests"), seen=str(seen), out=str(tmp_path / "out"),
                           tokenizer=str(tmp_path / "gpt2"), data=str(data))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"samples": 295, "torch": False, "transformers_auto": False}
    workers = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len({pid for pid, _ in workers}) == 2 and not any(torch for _, torch in workers)
