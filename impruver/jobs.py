"""The job graph: the one place that says what a stage needs before it runs.

``run_stage(stage, plan, **flags)`` is what the command line, sweeps and tests call with a frozen plan
(``run_job`` adds the run summary a sweep reads back):

    main / train:  compose the data if missing or stale -> freeze plan.yaml -> train here, or start the workers
    main:          ... then the check the plan names (``eval.questions``: the demo's held-out questions)
    eval:          ask a question file greedily, score exact match
    compose:       compose the data (again with --force)
    chat / serve / export: use what a run left

Under an outside launcher (``accelerate launch -m impruver ...``) every rank arrives here: the main rank composes
and freezes the plan once, the others wait, then all train.

A job that writes into ``output_dir`` (compose, train, main) holds its lock (:mod:`impruver.lock`): a second run on
the same folder stops at once, and the work files of a dead run are removed. A full disk or a refused write while
it runs ends in a message saying what to do (:func:`impruver.files.disk_errors`), not a traceback.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from impruver.errors import ConfigError, Problem, choices_hint

if TYPE_CHECKING:
    from impruver.plan import Plan

STAGES = ("compose", "train", "chat", "serve", "export", "eval")


def train_job(plan: Plan, *, force: bool = False) -> dict[str, Any]:
    """Compose if needed, freeze the plan, then train in this process or start the workers."""
    from impruver import launch
    from impruver.files import disk_errors
    from impruver.lock import run_lock
    from impruver.train.recipe import run as train

    if launch.under_launcher():  # the ranks of an outside launcher: its main process owns the folder
        with launch.ranks_lock(plan), disk_errors(plan.output_dir):
            launch.prepare_ranks(plan)
            return train(plan, worker=True)
    with run_lock(plan.output_dir), disk_errors(plan.output_dir):
        prepare(plan, force=force)
        if launch.needs_launch(plan):
            return launch.spawn(plan)
        return train(plan)


def main_job(plan: Plan, *, force: bool = False) -> dict[str, Any]:
    """The main job (``impruver [overrides]``): train, then ask the model the plan's questions (``eval``), once,
    in this process, when training has ended; the summary gets the accuracy. With ``export.gguf`` the GGUF files
    are written last (an adapter merged first)."""
    from impruver import launch
    from impruver.lock import run_lock

    if launch.under_launcher():
        return train_job(plan, force=force)
    from impruver.files import disk_errors

    with run_lock(plan.output_dir), disk_errors(plan.output_dir):  # held from training through the check
        result = train_job(plan, force=force)
        if plan.eval.questions:
            from impruver.evaluate import run as evaluate

            from impruver.train.outputs import record_check

            checked = evaluate(plan)
            record_check(plan, checked)  # into run.json and the model card, which training wrote before the check
            result = {**result, "eval_accuracy": checked["accuracy"], "eval_questions": checked["n"]}
        if plan.export.gguf:  # export.gguf: the run ends with its GGUF files (an adapter merged first)
            from impruver.train.export import run as export

            result = {**result, "gguf": export(plan)["gguf"]}
    return result


def compose_job(plan: Plan, *, force: bool = False, inspect: int | str | None = None,
                export_messages: str | None = None) -> Any:
    """The `impruver compose` stage (:func:`impruver.data.pipeline.run`) under the run folder's lock."""
    from impruver.data import pipeline
    from impruver.files import disk_errors
    from impruver.lock import run_lock

    with run_lock(plan.output_dir), disk_errors(plan.output_dir):
        return pipeline.run(plan, force=force, inspect=inspect, export_messages=export_messages)


def prepare(plan: Plan, *, force: bool = False) -> None:
    """The composed data up to date (recomposed with ``force``) and ``plan.yaml`` frozen in the output folder."""
    from impruver.data import pipeline
    from impruver.plan.probes import check_hub

    check_hub(plan, recompose=force)  # every Hub id this machine lacks, at once, before anything runs
    if force:
        pipeline.run(plan, force=True)
    else:
        pipeline.ensure_composed(plan)
    plan.write()


# Each stage's run function, imported only when it runs (the recipes import torch). Its keyword-only
# parameters are the stage's command-line flags: chat's `prompt` is `--prompt`, compose's `force` `--force`.
STAGE_FUNCTIONS = {
    "main": "impruver.jobs:main_job",
    "train": "impruver.jobs:train_job",
    "compose": "impruver.jobs:compose_job",
    "chat": "impruver.chat.repl:run",
    "serve": "impruver.chat.server:run",
    "export": "impruver.train.export:run",
    "eval": "impruver.evaluate:run",
}


def stage_function(stage: str) -> Callable[..., Any]:
    if stage not in STAGE_FUNCTIONS:
        raise ConfigError([Problem("", f"unknown stage '{stage}'; {choices_hint(stage, STAGES)}")])
    module, _, name = STAGE_FUNCTIONS[stage].partition(":")
    return getattr(importlib.import_module(module), name)


def stage_flags(stage: str) -> dict[str, bool]:
    """The flags of a stage, from its run function's keyword-only parameters: ``{name: takes_a_value}``.

    A parameter whose default is ``False`` is a switch (``--force``); any other takes a value (``--dest X``).
    """
    flags = {}
    for param in inspect.signature(stage_function(stage)).parameters.values():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            flags[param.name] = param.default is not False
    return flags


def prepare_sweep(plans: list[Plan]) -> None:
    """Compose the data of a sweep's jobs once, before they start (joblib runs them at once, and two jobs must
    not compose the same folder concurrently); each job then finds its data up to date."""
    from impruver.data import pipeline
    from impruver.lock import run_lock

    seen: set[str] = set()
    for plan in plans:
        if plan.train_path not in seen:
            seen.add(plan.train_path)
            with run_lock(plan.output_dir):
                pipeline.ensure_composed(plan)


def run_stage(stage: str, plan: Plan, **flags: Any) -> Any:
    """Run one stage of a validated plan with its flags."""
    return stage_function(stage)(plan, **flags)


def run_job(stage: str, plan: Plan, overrides: list[str], **flags: Any) -> Any:
    """One job of the command line or of a sweep: the stage, then (for training) ``run_summary.json`` with the
    job's overrides and results, which a sweep's summary and people read back."""
    result = run_stage(stage, plan, **flags)
    if stage in ("main", "train"):
        write_run_summary(plan, result, overrides)
    return result


def write_run_summary(plan: Plan, result: Any, overrides: list[str]) -> None:
    from impruver.files import atomic_write_text
    from impruver.layout import RunLayout

    record: dict[str, Any] = {"overrides": overrides, "output_dir": plan.output_dir}
    if isinstance(result, dict):
        record.update({k: v for k, v in result.items() if isinstance(v, (int, float, str, bool, type(None)))})
    atomic_write_text(RunLayout.of(plan.output_dir).run_summary, json.dumps(record, indent=2, ensure_ascii=False))


__all__ = ["STAGES", "STAGE_FUNCTIONS", "compose_job", "main_job", "prepare", "prepare_sweep", "run_job", "run_stage", "stage_flags",
           "stage_function", "train_job", "write_run_summary"]
