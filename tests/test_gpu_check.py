"""bench/gpu_check.py keeps working without a GPU: tiny shapes on the CPU, CUDA-only sections skipped, JSON out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.mark.integration
def test_gpu_check_runs_tiny_and_reports_every_section() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["tiny"] is True and set(report["versions"]) >= {"torch", "transformers", "bitsandbytes"}
    assert set(report) >= {"device", "cuda", "throughput", "qlora", "fsdp", "wall_s", "budget_s"}

    tiny = report["throughput"]["tiny"]
    assert "error" not in tiny, tiny.get("error")
    for side in ("impruver", "trainer"):
        assert tiny[side]["useful_tokens_per_s"] > 0 and tiny[side]["steps_timed"] >= 1
        assert "mfu" in tiny[side] and "peak_memory_gib" in tiny[side]
    assert "DataCollatorWithFlattening" in tiny["settings"]["trainer"]  # the Trainer packs too

    qlora, fsdp = report["qlora"], report["fsdp"]
    estimate = qlora["plan_estimate_gib"]
    assert estimate["total_gib"] > 0 and "weights_gib" in estimate  # impruver's own plan estimate (GiB)
    if report["cuda"]:
        assert "error" not in qlora and "error" not in fsdp, (qlora.get("error"), fsdp.get("error"))
    else:
        assert qlora["skipped"] == fsdp["skipped"] == "no CUDA"


@pytest.mark.integration
def test_a_failing_section_is_reported_and_the_others_run(tmp_path: Path) -> None:
    """One section's failure is its error in the JSON (here: a section name that does not exist)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    failed = gpu_check.run_section("no-such-section", tiny=True, timeout=120)
    assert "KeyError" in failed["error"]
    timed_out = gpu_check.run_section("throughput:tiny", tiny=True, timeout=1)
    assert timed_out["error"] == "timed out after 1 s"
