"""impruver.evaluate without a model: the exact-match scorer, per-group accuracy, and reading question files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from impruver.errors import DataError, RunError
from impruver.evaluate import EvalSpec, Question, exact_match, load_questions, normalise, score


@pytest.mark.parametrize(("reply", "answer", "same"), [
    ("The capital of France is Paris.", "the capital of france is paris", True),  # case, trailing full stop
    ("  2 + 3   =\n5 ", "2 + 3 = 5.", True),  # runs of whitespace are one space, outer space goes
    ("Antonym: «cold»!", "antonym: «cold»", True),  # trailing punctuation, closing quotes included
    ("ПАРИЖ", "Париж.", True),  # Cyrillic case folds too
    ("Paris, France.", "Paris.", False),  # only the end is normalised: other words still count
    ("2 + 3 = 6.", "2 + 3 = 5.", False),
    ("Paris", "Pari", False),
    ("", "Paris.", False),
])
def test_exact_match_normalises_only_case_spaces_and_the_end(reply: str, answer: str, same: bool) -> None:
    assert exact_match(reply, [answer]) is same


def test_normalise_is_unicode_aware() -> None:
    composed, decomposed = "ёлка", "е\u0308лка"  # the same word, NFC and NFD
    assert normalise(composed) == normalise(decomposed)
    assert exact_match("Paris", ["Lyon", "paris."])  # any accepted answer


def test_score_counts_overall_and_per_group() -> None:
    questions = [Question(({"role": "user", "content": f"q{i}"},), (answer,), tags, i + 1)
                 for i, (answer, tags) in enumerate([
                     ("a.", {"kind": "x", "lang": "en"}), ("b.", {"kind": "x", "lang": "ru"}),
                     ("c.", {"kind": "y", "lang": "en"}), ("d.", {"kind": "y", "lang": "ru"})])]
    summary = score(questions, ["A", "wrong", "c", "d!"])
    assert (summary["n"], summary["correct"], summary["accuracy"]) == (4, 3, 0.75)
    assert summary["by"]["kind"] == {"x": {"n": 2, "correct": 1, "accuracy": 0.5},
                                     "y": {"n": 2, "correct": 2, "accuracy": 1.0}}
    assert summary["by"]["lang"]["ru"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert "split" not in summary["by"]  # no question has that key
    assert [r["correct"] for r in summary["results"]] == [True, False, True, True]
    assert summary["results"][1] == {"line": 2, "prompt": "q1", "answer": "b.", "reply": "wrong", "correct": False,
                                     "kind": "x", "lang": "ru"}


def _write(tmp_path: Path, *lines: object) -> str:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    return str(path)


def test_question_file_forms(tmp_path: Path) -> None:
    source = _write(tmp_path, {"prompt": "Hi?", "answer": "Hello."}, "",
                    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                     "answer": ["4.", "2 + 2 = 4."], "kind": "arithmetic", "weight": 2})
    first, second = load_questions(source)
    assert first.messages == ({"role": "user", "content": "Hi?"},) and first.answers == ("Hello.",)
    assert second.prompt == "2+2?" and second.answers == ("4.", "2 + 2 = 4.") and second.line == 3
    assert second.tags == {"kind": "arithmetic"}  # string keys only are groups


def test_every_bad_line_is_reported_at_once(tmp_path: Path) -> None:
    source = _write(tmp_path, {"prompt": "ok", "answer": "ok"}, "{not json", {"prompt": "no answer"},
                    {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "answer": "x"},
                    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                     "answer": "a"}, ["a list"])
    with pytest.raises(DataError) as caught:
        load_questions(source)
    message = str(caught.value)
    assert "5 bad question line(s)" in message
    for line in (2, 3, 4, 5, 6):
        assert f"questions.jsonl:{line}:" in message
    assert "questions.jsonl:1:" not in message
    assert "last turn must be the user's" in message


def test_missing_file_and_spec_checks(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="eval.questions=demo"):
        load_questions(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValidationError):
        EvalSpec(max_new_tokens=0)
    with pytest.raises(ValidationError):
        EvalSpec(questions="demo", extra=1)  # unknown keys are errors
    spec = EvalSpec(questions="demo")
    with pytest.raises(ValidationError):
        spec.show = 3  # frozen


def test_the_demo_heldout_set_loads() -> None:
    questions = load_questions("demo")
    assert len(questions) >= 90
    assert {q.tags["lang"] for q in questions} == {"en", "ru"}
    assert {q.tags["split"] for q in questions} == {"combination", "phrasing"}


@pytest.mark.integration
def test_the_check_a_run_ends_with_reaches_run_json_and_the_model_card(tmp_path: Path) -> None:
    """Training writes run.json and the card before the main job's check runs; the check's accuracy joins both."""
    import os
    import subprocess
    import sys

    questions = _write(tmp_path, {"prompt": "Сколько будет 2 + 3?", "answer": "2 + 3 = 5."},
                       {"prompt": "What is 7 + 5?", "answer": "7 + 5 = 12."})
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "impruver", f"output_dir={out}", "train.max_steps=1",
                           "train.eval_steps=1000", "train.save_steps=1000", f"eval.questions={questions}",
                           "eval.max_new_tokens=4"], cwd=tmp_path, env=env, text=True, capture_output=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    checked = json.loads((out / "eval.json").read_text())
    record = json.loads((out / "run.json").read_text())
    assert record["eval_accuracy"] == checked["accuracy"] and record["eval_questions"] == 2
    assert record["steps"] == 1 and "strategy" in record  # training's record, kept
    card = (out / "README.md").read_text()
    assert f"**Check:** {round(2 * checked['accuracy'])}/2 held-out questions of `{questions}`" in card
    assert "| eval_accuracy |" in card
