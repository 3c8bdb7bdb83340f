"""The benchmarks run and print their side-by-side JSON (no timing is asserted: times are the GPU's business)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(*argv: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_compose_bench_compares_with_the_bare_tokenizer(shared_data: Path) -> None:
    report = run_bench(str(BENCH / "compose.py"), "--records", "1000", "--repeat", "1")
    for side in ("compose_near_on", "compose_near_off", "bare_tokenizer"):
        assert report[side]["records_per_s"] > 0
    assert report["ratio_near_off_to_bare"] > 0


@pytest.mark.integration
def test_train_bench_compares_with_the_trainer() -> None:
    report = run_bench(str(BENCH / "train.py"), "--steps", "3", "--warmup", "1", "--chats", "80")
    assert report["impruver"]["useful_tokens_per_s"] > 0 and report["trainer"]["useful_tokens_per_s"] > 0
    assert report["ratio"] > 0
    assert report["impruver"]["padding_share"] < report["trainer"]["padding_share"]  # packing vs padding
