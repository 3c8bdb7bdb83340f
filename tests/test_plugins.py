"""A third-party plugin adds a dataset format and a `dataset=` option with no change to impruver.

The example plugin in tests/plugins/impruver_example_plugin is installed (pip --target, into a temporary folder)
and used through its entry points only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = Path(__file__).parent / "plugins" / "impruver_example_plugin"
IMPRUVER = Path(sys.executable).with_name("impruver")


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("plugin-site")
    source = tmp_path_factory.mktemp("plugin-src") / PLUGIN.name
    shutil.copytree(PLUGIN, source)  # build outside the repository: setuptools writes build/ beside the source
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        capture_output=True, text=True, cwd=source.parent,
    )
    assert result.returncode == 0, result.stderr
    assert any(target.glob("impruver_example_plugin-*.dist-info"))
    return target


def run_with_plugin(site: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([str(IMPRUVER), *argv], capture_output=True, text=True, env=env, cwd=cwd)


def test_without_the_plugin_its_names_are_unknown(tmp_path: Path) -> None:
    result = subprocess.run([str(IMPRUVER), "plan", "dataset=example_qa"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2 and "example_qa" in result.stderr


def test_ls_shows_the_plugin_with_its_package(plugin_site: Path, tmp_path: Path) -> None:
    result = run_with_plugin(plugin_site, "ls", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("qa-pairs" in line and "impruver-example-plugin" in line for line in lines)
    assert any("example_qa (impruver-example-plugin)" in line for line in lines)


def test_plugin_dataset_option_plans(plugin_site: Path, tmp_path: Path) -> None:
    result = run_with_plugin(plugin_site, "plan", "--yaml", "dataset=example_qa", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "format: qa-pairs" in result.stdout and "pkg://impruver_example_plugin/data/qa.jsonl" in result.stdout
    bad = run_with_plugin(plugin_site, "plan", "dataset=example_qa", "dataset.sources.example_qa.format=qa-pair",
                          cwd=tmp_path)
    assert bad.returncode == 2 and "did you mean 'qa-pairs'" in bad.stderr


def test_plugin_format_composes_data(plugin_site: Path, tmp_path: Path) -> None:
    result = run_with_plugin(plugin_site, "compose", "dataset=example_qa", f"output_dir={tmp_path / 'run'}",
                             "dataset.dedup.near=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    rows = [json.loads(line) for name in ("train", "val")
            for line in (tmp_path / "run" / "data" / f"{name}.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert all(any(label != -100 for label in row["labels"]) for row in rows)


def test_in_process_refresh(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from impruver import registry

    assert not registry.has("formats", "qa-pairs")
    monkeypatch.syspath_prepend(str(plugin_site))
    registry.refresh_entry_points()
    try:
        assert registry.has("formats", "qa-pairs")
        convert = registry.lookup("formats", "qa-pairs")
        (conversation,) = convert({"question": "Q?", "answer": "A.", "topic": "t"})
        assert [m["role"] for m in conversation["messages"]] == ["system", "user", "assistant"]
        entry = next(e for e in registry.available("formats") if e.name == "qa-pairs")
        assert entry.provider == "impruver-example-plugin"
        from impruver.compose import compose

        composed = compose(["dataset=example_qa"])
        assert composed.config["dataset"]["sources"]["example_qa"]["format"] == "qa-pairs"
    finally:
        monkeypatch.undo()
        registry.refresh_entry_points()
    assert not registry.has("formats", "qa-pairs")
