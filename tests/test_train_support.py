"""Helpers for the training tests (imported by tests/test_train_*.py), and tests of the data rows they build on.

Everything is built in code: a byte-level BPE tokenizer trained on a few sentences, token JSONL of learnable
synthetic samples (an untrained prompt, then a trained answer that continues a counting pattern), and plans of
tiny GPT-2 / Llama models. The data stage is stood in for by files written here: ``use_files`` points
``impruver.data.pipeline``'s two entry points at them (the real pipeline composes chats; tests of that live with
the data stage).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from impruver.plan import make_plan

SAIGA = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
         "{% if add_generation_prompt %}<s>bot\n{% endif %}")
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def make_tokenizer(folder: Path, vocab_size: int = 320) -> Any:
    """A byte-level BPE with <pad> <s> </s> <unk> and a chat template, saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["hello world, how are you? I am fine, thank you.", "Привет, мир! Как дела? Всё хорошо.",
            "one two three four five six seven eight nine ten"] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.chat_template = SAIGA
    fast.save_pretrained(folder)
    return fast


def synthetic_rows(n: int, *, vocab: int, seed: int, min_len: int = 8,
                   max_len: int = 40) -> list[dict[str, Any]]:
    """Samples whose answer continues a counting pattern (learnable in a few steps); prompt labels are -100."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        start, stride = int(rng.integers(4, vocab)), int(rng.integers(1, 3))
        ids = [4 + (start + stride * i) % (vocab - 4) for i in range(length)]
        prompt = length // 3
        labels = [-100] * prompt + ids[prompt:]
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * length})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GPT2_ARCH = {"family": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 128, "vocab_size": 320}
LLAMA_ARCH = {"family": "llama", "n_layer": 2, "n_embd": 32, "n_head": 4, "n_kv_head": 2, "n_inner": 64,
              "n_positions": 128, "vocab_size": 320, "tie_word_embeddings": False}


def tiny_plan(out: Path, *, method: str = "scratch", arch: dict[str, Any] | None = None,
              model: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
              lora: dict[str, Any] | None = None, tokenizer_path: str | None = None) -> Any:
    """A plan of a tiny model on the CPU, reading data from ``out/data``."""
    model_spec = model or {"builder": "arch", "arch": arch or GPT2_ARCH, "dtype": "float32",
                           "chat_template": "saiga", "context_length": 128}
    method_spec: dict[str, Any] = {"builder": method}
    if method in ("lora", "qlora"):
        method_spec["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, **(lora or {})}
    config = {
        "output_dir": str(out), "seed": 7,
        "model": model_spec,
        "tokenizer": {"builder": "hf", "path": tokenizer_path or str(out / "tok"), "chat_template": "saiga"},
        "dataset": {"sources": {"demo": {"path": "unused.jsonl", "format": "openai"}}, "max_tokens": 128},
        "method": method_spec,
        "hardware": {"name": "cpu", "device": "cpu"},
        "train": {"batch_size": 4, "lr": 3e-3, "max_steps": 20, "eval_steps": 10, "save_steps": 10,
                  "logging_steps": 5, "warmup_steps": 2, "seed": 7, **(train or {})},
    }
    return make_plan(config)


@pytest.fixture
def use_files(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make ``impruver.data.pipeline`` read the tokenizer folder and JSONL a test wrote (no composition)."""
    from transformers import AutoTokenizer

    def ensure_composed(plan: Any, **_: Any) -> None:
        assert Path(plan.train_path).is_file(), "the test writes the data first"

    def load_composed_tokenizer(plan: Any) -> Any:
        return AutoTokenizer.from_pretrained(plan.tokenizer.path)

    try:
        import impruver.data.pipeline as pipeline
    except ImportError:
        pipeline = types.ModuleType("impruver.data.pipeline")
        monkeypatch.setitem(sys.modules, "impruver.data.pipeline", pipeline)
        import impruver.data

        monkeypatch.setattr(impruver.data, "pipeline", pipeline, raising=False)
    monkeypatch.setattr(pipeline, "ensure_composed", ensure_composed, raising=False)
    monkeypatch.setattr(pipeline, "load_composed_tokenizer", load_composed_tokenizer, raising=False)
    return pipeline


def prepare(out: Path, *, n_train: int = 48, n_val: int = 8, seed: int = 0) -> Path:
    """Tokenizer + train/val JSONL under ``out``; returns ``out``."""
    tok = make_tokenizer(out / "tok")
    write_jsonl(out / "data" / "train.jsonl", synthetic_rows(n_train, vocab=len(tok), seed=seed))
    write_jsonl(out / "data" / "val.jsonl", synthetic_rows(n_val, vocab=len(tok), seed=seed + 1))
    return out


# -- tests of rows, packing and collation ---------------------------------------------------------------------


def test_pack_fills_rows_and_keeps_every_sample() -> None:
    from impruver.train.data import pack

    lengths = np.array([5, 9, 3, 7, 2, 8, 1, 10])
    rows = pack(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == int(np.ceil(lengths.sum() / 10))  # 45 tokens -> 5 full-ish rows


def test_collate_shifts_targets_within_samples_only(tmp_path: Path) -> None:
    from impruver.train.data import collate, read_samples

    path = write_jsonl(tmp_path / "d.jsonl", [
        {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
        {"input_ids": [20, 21], "labels": [20, 21]},
    ])
    samples = read_samples(path, max_len=16)
    packed = collate(samples, [[0, 1]], pad_id=0, seq_len=8, packed=True)
    assert packed["input_ids"].tolist() == [[10, 11, 12, 20, 21, 0, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    # 12 never predicts 20 (the next sample's first token), and the first token of a sample is never a target
    assert packed["targets"].tolist() == [[11, 12, -100, 21, -100, -100, -100, -100]]
    assert (packed["n_tokens"], packed["n_targets"]) == (5, 3)
    assert "attention_mask" not in packed
    padded = collate(samples, [[0], [1]], pad_id=0, seq_len=8, packed=False)
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    assert padded["targets"].tolist()[1][:2] == [21, -100]


def test_read_samples_truncates_skips_and_names_bad_lines(tmp_path: Path) -> None:
    from impruver.errors import DataError
    from impruver.train.data import read_samples

    path = write_jsonl(tmp_path / "d.jsonl", [
        {"input_ids": list(range(10)), "labels": list(range(10))},
        {"input_ids": [1, 2, 3], "labels": [1, -100, -100]},  # nothing to predict after the first token
    ])
    samples = read_samples(path, max_len=6)
    assert len(samples) == 1 and samples.lengths().tolist() == [6]
    path.write_text('{"input_ids": [1, 2]}\n{"labels": [1]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2"):
        read_samples(path, max_len=6)


def test_batches_order_is_a_function_of_seed_and_epoch() -> None:
    from impruver.train.data import Batches

    rows = [[i] for i in range(10)]
    a, b = Batches(rows, 3, seed=1), Batches(rows, 3, seed=1)
    assert a.per_epoch == 4
    assert [a.get(1, i) for i in range(4)] == [b.get(1, i) for i in range(4)]
    assert sorted(r[0] for i in range(4) for r in a.get(0, i)) == list(range(10))
    assert [a.get(0, i) for i in range(4)] != [a.get(1, i) for i in range(4)]
    ranks = [Batches(rows, 2, seed=1, world_size=2, rank=r) for r in (0, 1)]
    seen = [r[0] for i in range(ranks[0].per_epoch) for b in ranks for r in b.get(0, i)]
    assert set(seen) == set(range(10))
