"""`impruver train --plan FILE` runs a frozen plan exactly; `<output_dir>/plan.yaml` is the record of the last run,
and a hand edit to it is kept and reported instead of being overwritten silently."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from test_leftovers import _cli
from test_train_support import prepare, tiny_plan, use_files  # noqa: F401  (fixture)

from impruver import cli
from impruver.plan import load_plan




def _plan(out: Path, **train: object):
    return tiny_plan(out, train={"max_steps": 2, "save_steps": None, "eval_steps": None, "logging_steps": 1,
                                 **train})


def test_train_plan_runs_the_file_exactly(tmp_path: Path, use_files, capsys) -> None:
    out = prepare(tmp_path / "run")
    plan_file = _plan(out, lr=0.0123, warmup_steps=0, scheduler="constant").write(tmp_path / "frozen")
    code, err = _cli(capsys, "train", "--plan", str(plan_file))
    assert code == 0, err
    assert load_plan(out).to_dict() == load_plan(plan_file).to_dict()  # the run's record is the file it ran
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["event"] == "train"]
    assert lrs == [0.0123, 0.0123]
    code, err = _cli(capsys, "train", "--plan", str(plan_file), "train.lr=1")
    assert code == 2 and "takes no overrides" in err


def test_a_plan_of_another_version_is_refused(tmp_path: Path, capsys) -> None:
    data = _plan(tmp_path / "run").to_dict()
    data["version"] = 1
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(data))
    code, err = _cli(capsys, "train", "--plan", str(old))
    assert code == 2 and "plan version 1" in err and "plan the run again" in err, err


def test_config_given_a_plan_yaml_says_use_plan(tmp_path: Path, capsys) -> None:
    plan_file = _plan(tmp_path / "run").write(tmp_path / "p")
    code, err = _cli(capsys, "train", "--config", str(plan_file))
    assert code == 2 and f"impruver train --plan {plan_file}" in err, err


def test_a_hand_edited_plan_yaml_is_kept_and_reported(tmp_path: Path, caplog) -> None:
    out = tmp_path / "run"
    plan = _plan(out)
    plan.write()
    assert plan.write() and not list(out.glob("plan.edited-*"))  # rewriting its own plan is silent
    edited = (out / "plan.yaml").read_text().replace("lr: 0.003", "lr: 0.5")
    (out / "plan.yaml").write_text(edited)
    logging.getLogger("impruver").addHandler(caplog.handler)
    try:
        plan.write()  # the next run writes its own plan
    finally:
        logging.getLogger("impruver").removeHandler(caplog.handler)
    backups = list(out.glob("plan.edited-*.yaml"))
    assert len(backups) == 1 and backups[0].read_text() == edited
    assert load_plan(out).train.lr == 0.003
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "edited by hand" in warned and "train.lr" in warned and f"--plan {backups[0]}" in warned, warned
    # An edit run as it is (train --plan on that file) is what the run writes back: nothing to keep.
    (out / "plan.yaml").write_text(edited.replace("lr: 0.5", "lr: 5.0e-1"))
    load_plan(out).write()
    assert len(list(out.glob("plan.edited-*.yaml"))) == 1
