"""roles_to_train and train_on_last_turn_only, set in the config, decide which turns the composed labels train."""

from __future__ import annotations

import json
from pathlib import Path

from impruver.record import IGNORE_INDEX


def _compose(tmp_path: Path, **source: object) -> list[dict]:
    from impruver.compose import compose
    from impruver.data.pipeline import run as compose_data
    from impruver.plan import make_plan

    data = tmp_path / "chats.jsonl"
    chat = {"messages": [{"role": "user", "content": "Привет"}, {"role": "assistant", "content": "Здравствуйте"},
                         {"role": "user", "content": "Как дела?"}, {"role": "assistant", "content": "Хорошо"}]}
    data.write_text("\n".join(json.dumps(chat, ensure_ascii=False) for _ in range(1)) + "\n", encoding="utf-8")
    extra = [f"+dataset.sources.mine.{k}={json.dumps(v)}" for k, v in source.items()]
    composed = compose([f"dataset.sources={{mine:{{path:'{data}',format:openai}}}}", f"output_dir={tmp_path}/out",
                        "dataset.val_fraction=0", "dataset.dedup.near=false", "dataset.dedup.exact=false", *extra])
    plan = make_plan(composed.config, choices=composed.choices)
    compose_data(plan)
    return [json.loads(line) for line in Path(plan.train_path).read_text(encoding="utf-8").splitlines()]


def _trained_text(tmp_path: Path, record: dict) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "data" / "tokenizer")
    ids = [i for i, label in zip(record["input_ids"], record["labels"]) if label != IGNORE_INDEX]
    return tok.decode(ids)


def test_every_answer_is_trained_by_default(tmp_path: Path) -> None:
    (record,) = _compose(tmp_path)
    text = _trained_text(tmp_path, record)
    assert "Здравствуйте" in text and "Хорошо" in text


def test_last_turn_only_leaves_earlier_answers_out_of_the_loss(tmp_path: Path) -> None:
    (record,) = _compose(tmp_path, train_on_last_turn_only=True)
    text = _trained_text(tmp_path, record)
    assert "Хорошо" in text and "Здравствуйте" not in text


def test_a_role_that_is_not_the_models_is_refused_at_planning(tmp_path: Path) -> None:
    import pytest

    from impruver.errors import ConfigError

    with pytest.raises(ConfigError, match="roles_to_train"):
        _compose(tmp_path, roles_to_train=["user"])
