"""`dataset.sources` on the command line: the mapping form replaces the dataset's sources, the list form names
each source by its `name:` or its file's stem; both the same in `impruver plan` and in the job Hydra runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from impruver import cli, jobs
from impruver.compose import compose, plan_job
from impruver.errors import ConfigError

DEMO = str(Path(__file__).resolve().parents[1] / "impruver" / "assets" / "demo" / "chats.jsonl")


def test_the_mapping_form_replaces_the_sources() -> None:
    assert set(plan_job(["dataset=saiga2"]).dataset.sources) > {"ru_turbo_saiga"}
    plan = plan_job(["dataset=saiga2", f"dataset.sources={{a: {{path: {DEMO}, format: openai, weight: 2}}}}"])
    assert list(plan.dataset.sources) == ["a"]
    assert plan.dataset.sources["a"].path == DEMO and plan.dataset.sources["a"].weight == 2
    assert plan.dataset.val_fraction == plan_job(["dataset=saiga2"]).dataset.val_fraction  # the rest stays


def test_the_list_form_names_sources_by_stem_or_name(tmp_path: Path) -> None:
    first, second = tmp_path / "chats_a.jsonl", tmp_path / "b.json"
    plan = plan_job([f"dataset.sources=[{{path: {first}, format: openai}}, "
                     f"{{name: mine, path: {second}, format: instruct}}]"])
    assert list(plan.dataset.sources) == ["chats_a", "mine"]
    assert plan.dataset.sources["mine"].format == "instruct"


def test_two_list_items_with_one_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        plan_job([f"dataset.sources=[{{path: {tmp_path}/a.jsonl, format: openai}}, "
                  f"{{path: {tmp_path}/x/a.jsonl, format: openai}}]"])
    assert "dataset.sources" in str(info.value) and "'a'" in str(info.value)


def test_a_source_key_still_merges() -> None:
    """Setting one key of one source keeps the others (only a whole mapping or list replaces)."""
    config = compose(["dataset=saiga2", "dataset.sources.ru_turbo_saiga.limit=10"]).config
    assert config["dataset"]["sources"]["ru_turbo_saiga"]["limit"] == 10
    assert len(config["dataset"]["sources"]) > 1


def test_the_job_hydra_runs_gets_the_same_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(jobs, "run_stage", lambda stage, plan, **flags: seen.append(plan))
    assert cli.main(["compose", f"dataset.sources={{a: {{path: {DEMO}, format: openai}}}}",
                     f"output_dir={tmp_path}"]) == 0
    (plan,) = seen
    assert list(plan.dataset.sources) == ["a"]
    assert plan == plan_job([f"dataset.sources={{a: {{path: {DEMO}, format: openai}}}}", f"output_dir={tmp_path}"])
