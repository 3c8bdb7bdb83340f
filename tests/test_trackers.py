"""``train.report_to``: every tracker accelerate supports, validated at planning against accelerate's own list; a
missing package reported before anything runs; a run logs to the trackers (through accelerate) the same records
it writes to metrics.jsonl, and keeps metrics.jsonl and loss.png."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_train_support import prepare, tiny_plan, use_files  # noqa: F401

from impruver.errors import ConfigError


def test_the_tracker_names_are_accelerates_own() -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    from impruver.train.metrics import tracker_names

    assert set(tracker_names()) == set(LOGGER_TYPE_TO_CLASS)
    assert {"wandb", "tensorboard", "mlflow", "trackio"} <= set(tracker_names())


def test_an_unknown_tracker_is_a_plan_error_with_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        tiny_plan(tmp_path, train={"report_to": ["tensorbord"]})
    assert "train.report_to" in str(caught.value) and "tensorboard" in str(caught.value)


def test_a_missing_tracker_package_is_reported_at_planning(tmp_path: Path) -> None:
    from impruver.plan import environment_problems

    absent = [n for n in ("aim", "swanlab", "dvclive", "clearml") if importlib.util.find_spec(n) is None][:2]
    assert absent, "every candidate tracker is installed here: pick others"
    plan = tiny_plan(tmp_path, train={"report_to": ["tensorboard", *absent]})
    problems = [p for p in environment_problems(plan) if p.key == "train.report_to"]
    assert [p.message.split(" ")[0] for p in problems] == absent  # all at once; tensorboard is installed
    assert all(f"pip install {name}" in p.message for name, p in zip(absent, problems))


def test_a_run_logs_its_records_to_tensorboard_through_accelerate(tmp_path: Path, use_files) -> None:  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from impruver.train.recipe import run

    out = prepare(tmp_path / "run")
    run(tiny_plan(out, train={"max_steps": 6, "logging_steps": 2, "eval_steps": 3, "save_steps": 100,
                              "report_to": ["tensorboard"]}))
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = list((out / "trackers").rglob("events.out.tfevents.*"))
    assert events, sorted(p.relative_to(out) for p in (out / "trackers").rglob("*"))
    scalars: dict[str, dict[int, float]] = {}
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    train = {r["step"]: r["loss"] for r in records if r["event"] == "train"}
    evals = {r["step"]: r["eval_loss"] for r in records if r["event"] == "eval"}
    assert sorted(scalars["train/loss"]) == sorted(train) == [1, 2, 4, 6]
    assert scalars["train/loss"] == pytest.approx(train, rel=1e-5)
    assert scalars["eval/eval_loss"] == pytest.approx(evals, rel=1e-5) and evals
