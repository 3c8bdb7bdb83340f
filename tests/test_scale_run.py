"""Distributed runs on the CPU (gloo): two ranks through accelerate (sweeps: tests/test_sweep.py).

These start real processes (`impruver` and `accelerate launch`), so they are the slowest tests of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

IMPRUVER = Path(sys.executable).with_name("impruver")
TINY = ["preset=demo", "train.logging_steps=1", "train.eval_steps=1000", "train.save_steps=1000",
        "dataset.dedup.near=false"]

pytestmark = pytest.mark.integration


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_losses(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("event") == "train"]


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Compose the demo data once for every run of this module."""
    root = tmp_path_factory.mktemp("scale-data")
    paths = [f"train_path={root / 'train.jsonl'}", f"val_path={root / 'val.jsonl'}"]
    run([str(IMPRUVER), "compose", *TINY, *paths, f"output_dir={root}"], cwd=root)
    return paths


def test_two_ranks_match_one_process(tmp_path: Path, shared_data: list[str]) -> None:
    steps = ["train.max_steps=3"]
    single = tmp_path / "single"
    run([str(IMPRUVER), *TINY, *shared_data, *steps, "train.batch_size=4", f"output_dir={single}"], cwd=tmp_path)
    ddp = tmp_path / "ddp"
    run([str(IMPRUVER), *TINY, *shared_data, *steps, "hardware=cpu_ddp", "hardware.num_processes=2",
         "train.batch_size=2", f"output_dir={ddp}"], cwd=tmp_path)

    record = json.loads((ddp / "run.json").read_text())
    assert record["world_size"] == 2  # both ranks took part: the run's own record says so
    assert json.loads((single / "run.json").read_text())["world_size"] == 1
    # The same global batch (2 ranks x 2 rows = 4 rows): the same losses, step by step.
    assert train_losses(ddp) == pytest.approx(train_losses(single), rel=1e-4)
    # Outputs and plan written once, by the main process.
    assert len(list(ddp.rglob("plan.yaml"))) == 1
    assert len(list(ddp.rglob("model.safetensors"))) == 1
    assert sum(1 for r in (ddp / "metrics.jsonl").read_text().splitlines() if '"event": "end"' in r) == 1


def test_accelerate_launch_form(tmp_path: Path, shared_data: list[str]) -> None:
    out = tmp_path / "launched"
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", "29533", "-m", "impruver", *TINY, *shared_data, "train.max_steps=2",
         "hardware=cpu_ddp", "train.batch_size=2", f"output_dir={out}"], cwd=tmp_path)
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert len(list(out.rglob("plan.yaml"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["launched"], "no stray run folders"
