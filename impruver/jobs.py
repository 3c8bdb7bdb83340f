"""The job graph: the one place that says what a stage needs before it runs.

``run_stage(stage, plan, **flags)`` is what the command line, sweeps and tests call with a frozen plan:

    main / train:  compose the data if missing or stale -> freeze plan.yaml -> train here, or start the workers
    compose:       compose the data (again with --force)
    chat / serve / export: use what a run left

Under an outside launcher (``accelerate launch -m impruver ...``) every rank arrives here: the main rank composes
and freezes the plan once, the others wait, then all train.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from impruver.errors import ConfigError, Problem, choices_hint

if TYPE_CHECKING:
    from impruver.plan import Plan

STAGES = ("compose", "train", "chat", "serve", "export")


def train_job(plan: Plan, *, force: bool = False) -> dict[str, Any]:
    """Compose if needed, freeze the plan, then train in this process or start the workers."""
    from impruver import launch
    from impruver.train.recipe import run as train

    if launch.under_launcher():
        launch.prepare_ranks(plan)
        return train(plan, worker=True)
    prepare(plan, force=force)
    if launch.needs_launch(plan):
        return launch.spawn(plan)
    return train(plan)


def prepare(plan: Plan, *, force: bool = False) -> None:
    """The composed data up to date (recomposed with ``force``) and ``plan.yaml`` frozen in the output folder."""
    from impruver.data import pipeline

    if force:
        pipeline.run(plan, force=True)
    else:
        pipeline.ensure_composed(plan)
    plan.write()


def run_stage(stage: str, plan: Plan, **options: Any) -> Any:
    """Run one stage of a validated plan. The recipes are imported only here (they import torch)."""
    if stage in ("main", "train"):
        return train_job(plan, **options)
    if stage == "compose":
        from impruver.data.pipeline import run as compose_data

        return compose_data(plan, **options)
    if stage == "chat":
        from impruver.chat.repl import run as chat

        return chat(plan, **options)
    if stage == "serve":
        from impruver.chat.server import run as serve

        return serve(plan, **options)
    if stage == "export":
        from impruver.train.export import run as export

        return export(plan, **options)
    raise ConfigError([Problem("", f"unknown stage '{stage}'; {choices_hint(stage, STAGES)}")])


__all__ = ["STAGES", "prepare", "run_stage", "train_job"]
