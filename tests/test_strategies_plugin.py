"""A distribution strategy from a plugin (entry point ``impruver_strategies``) runs two CPU ranks, no change to impruver.

The example plugin's ``ddp_static`` (DDP with a static graph and 1 MiB buckets) is installed into a temporary
folder; the run's own record says which strategy ran, with what settings, on how many ranks.
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
TINY = ["preset=demo", "train.logging_steps=1", "train.eval_steps=1000", "train.save_steps=1000",
        "dataset.dedup.near=false", "train.max_steps=3", "train.batch_size=2"]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a process that sees the installed example plugin (and nothing else changed)."""
    target = tmp_path_factory.mktemp("plugin-site")
    source = tmp_path_factory.mktemp("plugin-src") / PLUGIN.name
    shutil.copytree(PLUGIN, source)  # setuptools writes build/ beside the source: not in the repository
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)], capture_output=True, text=True, cwd=source.parent)
    assert result.returncode == 0, result.stderr
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    return env


def test_plugin_strategy_trains_two_ranks(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    out = tmp_path / "run"
    argv = [str(IMPRUVER), *TINY, "hardware=cpu_ddp", "hardware.distributed=ddp_static", f"output_dir={out}"]
    result = subprocess.run(argv, capture_output=True, text=True, env=plugin_env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 3
    strategy = record["strategy"]
    assert strategy["name"] == "ddp_static" and strategy["distributed_type"] == "MULTI_CPU"
    assert strategy["ddp"] == {"static_graph": True, "bucket_cap_mb": 1}
    assert "--multi_gpu" in strategy["launch_args"]
    # Log lines come from rank 0 alone: one line per logged step, not one per rank.
    assert sum("step 3/3" in line for line in result.stderr.splitlines()) == 1


def test_without_the_plugin_the_strategy_is_unknown(tmp_path: Path) -> None:
    result = subprocess.run([str(IMPRUVER), *TINY, "hardware=cpu_ddp", "hardware.distributed=ddp_static",
                             f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=600)
    assert result.returncode != 0 and "ddp_static" in result.stderr
