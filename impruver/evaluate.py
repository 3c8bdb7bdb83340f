"""`impruver eval`: ask what a run trained a file of questions, greedily, and score the replies by exact match.

A question file is JSONL, one question per line::

    {"prompt": "What is 2 + 3?", "answer": "2 + 3 = 5."}
    {"messages": [{"role": "user", "content": "Столица Франции?"}], "answer": ["Париж.", "Столица Франции — Париж."]}

``messages`` is the conversation up to the reply (impruver's roles, the last one a user turn); ``prompt`` is the
short form of one user turn. ``answer`` is the expected reply, or a list of accepted replies. Any other keys
(``kind``, ``lang``, ``split``...) are kept, and accuracy is also reported per value of ``kind``, ``lang`` and
``split``. ``questions: demo`` is the demo's own held-out set (``impruver/assets/demo/heldout.jsonl``: the demo's
question kinds in combinations and phrasings that its training chats never contain).

Replies are generated exactly as ``impruver chat`` generates them (the same loading, chat template and
``model.generate``), but greedily: no sampling and no repetition penalty, so a score is the model's own most
likely reply and is reproducible. Exact match compares the reply and each accepted answer after a
normalisation that is written out in :data:`NORMALISATION`: Unicode NFC, case folded, runs of whitespace made
one space, and punctuation and spaces at the end removed ("Paris." and "paris" match; "Paris, France" and
"Paris" do not).
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from impruver.errors import DataError, RunError
from impruver.files import atomic_write_text
from impruver.layout import RunLayout
from impruver.plan.schema import EvalSpec

if TYPE_CHECKING:
    from impruver.plan import Plan

DEMO = "demo"  # eval.questions=demo: the demo's held-out questions, shipped with impruver
GROUP_KEYS = ("kind", "lang", "split")  # question keys that accuracy is also broken down by
TRAILING = ".,;:!?…。»\"' \t\n"  # stripped from the end before comparing (a closing quote is punctuation too)
NORMALISATION = ("Unicode NFC; case folded; whitespace runs -> one space; trailing punctuation, quotes and "
                 "spaces removed")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Question:
    """One line of a question file."""

    messages: tuple[dict[str, Any], ...]  # the conversation up to the reply; the last turn is the user's
    answers: tuple[str, ...]  # accepted replies
    tags: dict[str, str] = field(default_factory=dict)  # kind / lang / split and any other string keys
    line: int = 0

    @property
    def prompt(self) -> str:
        return str(self.messages[-1]["content"])


# -- scoring (no torch) ----------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """The form replies and answers are compared in (see :data:`NORMALISATION`)."""
    text = _SPACES.sub(" ", unicodedata.normalize("NFC", text).casefold())
    return text.rstrip(TRAILING).strip()


def exact_match(reply: str, answers: Sequence[str]) -> bool:
    """Whether the reply equals one of the accepted answers after :func:`normalise`."""
    return normalise(reply) in {normalise(a) for a in answers}


def score(questions: Sequence[Question], replies: Sequence[str]) -> dict[str, Any]:
    """Accuracy overall and per kind / lang / split, and one result per question, in order."""
    results = [{"line": q.line, "prompt": q.prompt, "answer": q.answers[0], "reply": r,
                "correct": exact_match(r, q.answers), **q.tags} for q, r in zip(questions, replies, strict=True)]
    summary: dict[str, Any] = _accuracy(results)
    summary["by"] = {key: {value: _accuracy([r for r in results if r.get(key) == value])
                           for value in sorted({r[key] for r in results if key in r})}
                     for key in GROUP_KEYS if any(key in r for r in results)}
    summary["results"] = results
    return summary


def _accuracy(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    correct = sum(r["correct"] for r in results)
    return {"n": len(results), "correct": correct, "accuracy": round(correct / len(results), 4) if results else 0.0}


# -- question files (no torch) ---------------------------------------------------------------------------------


def question_file(source: str) -> Path:
    """The file behind ``eval.questions``: ``demo`` is the bundled held-out set, anything else a path."""
    if source == DEMO:
        return Path(str(resources.files("impruver.assets.demo").joinpath("heldout.jsonl")))
    path = Path(source).expanduser()
    if not path.is_file():
        raise RunError(f"eval.questions={source}: no such file. Give a JSONL file of "
                       f'{{"prompt" or "messages", "answer"}} lines, or eval.questions={DEMO} for the demo\'s '
                       f"held-out questions.")
    return path


def load_questions(source: str) -> list[Question]:
    """Read and check a question file; every bad line is reported at once, with its number."""
    path = question_file(source)
    questions, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            questions.append(_question(json.loads(line), number))
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            problems.append(f"{path}:{number}: {exc}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DataError(f"{len(problems)} bad question line(s) in {path}; each line is "
                        f'{{"prompt": TEXT or "messages": [...], "answer": TEXT or [TEXT, ...]}}:\n  {shown}')
    if not questions:
        raise DataError(f"{path} holds no questions")
    return questions


def _question(record: Any, number: int) -> Question:
    if not isinstance(record, dict):
        raise TypeError("a line must be a JSON object")
    answer = record.get("answer")
    answers = [answer] if isinstance(answer, str) else answer
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError('"answer" must be a string or a non-empty list of strings')
    if ("prompt" in record) == ("messages" in record):
        raise ValueError('give exactly one of "prompt" (a string) and "messages" (a list of turns)')
    messages = [{"role": "user", "content": record["prompt"]}] if "prompt" in record else record["messages"]
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} turns with string content')
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last turn must be the user's (the reply is what is scored), "
                         f"not \"{messages[-1]['role']}\"")
    tags = {k: v for k, v in record.items() if k not in ("prompt", "messages", "answer") and isinstance(v, str)}
    return Question(tuple(messages), tuple(answers), tags, number)


# -- the stage -------------------------------------------------------------------------------------------------


def run(plan: Plan, spec: EvalSpec | None = None, *, questions: str | None = None) -> dict[str, Any]:
    """Answer every question of a file with the model ``plan.output_dir`` holds, greedily; score, print, save.

    Args:
        plan: the validated plan; ``plan.eval`` gives the defaults.
        questions: a question file or ``demo``; overrides the spec's.
        spec: the eval settings; default ``plan.eval``.

    Returns:
        The summary written to ``<output_dir>/eval.json``: accuracy, per-group accuracy, settings and every result.

    Raises:
        RunError: no question file is named, or there is no trained model to ask.
        DataError: the question file has bad lines.
    """
    from impruver.chat.load import locate

    spec = spec or plan.eval
    source = questions or spec.questions
    if not source:
        raise RunError(f"no questions to ask: set eval.questions=PATH (a JSONL of prompt/answer lines) or "
                       f"eval.questions={DEMO}")
    items = load_questions(source)  # a bad file fails before the model is loaded
    locate(plan.output_dir, model_path=plan.model.path)
    started = time.perf_counter()
    replies, described = _answer(plan, items, spec.max_new_tokens)
    summary = {"questions": source, "file": str(question_file(source)), "model": described,
               "decoding": "greedy (no sampling, no repetition penalty)", "max_new_tokens": spec.max_new_tokens,
               "normalisation": NORMALISATION, **score(items, replies),
               "seconds": round(time.perf_counter() - started, 1)}
    report = RunLayout.of(plan.output_dir).eval_report
    atomic_write_text(report, json.dumps(summary, ensure_ascii=False, indent=1))
    _show(summary, spec.show, report)
    return summary


def _answer(plan: Plan, questions: Sequence[Question], max_new_tokens: int) -> tuple[list[str], str]:
    """Each question's greedy reply, generated the way `impruver chat` generates; and what model answered."""
    from impruver.chat.generate import Generation, fit, generation_kwargs
    from impruver.chat.load import load, quiet_libraries

    quiet_libraries()
    loaded = load(plan)
    greedy = plan.chat.model_copy(update={"do_sample": False, "repetition_penalty": 1.0})
    kwargs = generation_kwargs(greedy, max_new_tokens=max_new_tokens)
    budget = max(1, loaded.context_length - max_new_tokens)  # prompt tokens that leave room for the reply
    replies = []
    for question in questions:
        ids, _ = fit(loaded.tokenizer, list(question.messages), budget)
        replies.append(Generation(loaded.model, loaded.tokenizer, ids, kwargs).wait())
    return replies, loaded.describe()


def _show(summary: dict[str, Any], show: int, report: Path) -> None:
    """A table of a few replies (wrong ones first), the accuracy per group, and one line with the accuracy."""
    from rich.table import Table

    from impruver.ui import console, log

    results = summary["results"]
    examples = ([r for r in results if not r["correct"]][:(show + 1) // 2] if show else [])
    examples += [r for r in results if r["correct"]][:show - len(examples)]
    examples += [r for r in results if not r["correct"] and r not in examples][:show - len(examples)]
    if examples:
        table = Table(title=f"eval: {summary['questions']} (greedy, exact match)", title_justify="left",
                      caption=f"{summary['correct']} of {summary['n']} exact ({summary['accuracy']:.1%})",
                      caption_justify="left")
        for column in ("", "question", "expected", "reply"):
            table.add_column(column, overflow="fold")
        for r in sorted(examples, key=lambda r: r["line"]):
            table.add_row("[green]✓[/]" if r["correct"] else "[red]✗[/]", r["prompt"], r["answer"], r["reply"])
        console.print(table)
    groups = "; ".join(f"{key} " + ", ".join(f"{value} {g['accuracy']:.0%}" for value, g in values.items())
                       for key, values in summary["by"].items())
    log.info("eval: %d of %d exact (%.1f%%) on %s in %.1f s%s; details in %s", summary["correct"], summary["n"],
             100 * summary["accuracy"], summary["questions"], summary["seconds"], f" ({groups})" if groups else "",
             report)


__all__ = ["DEMO", "EvalSpec", "Question", "exact_match", "load_questions", "normalise", "question_file", "run",
           "score"]
