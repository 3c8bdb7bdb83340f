"""Distributed runs on the CPU (gloo): two ranks through accelerate, DDP and FSDP2 (sweeps: tests/test_sweep.py).

These start real processes (`impruver` and `accelerate launch`), so they are the slowest tests of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
    assert not (out / ".lock").exists(), "the lock the main rank held is released"

    # A folder another run holds: every rank stops with the holder's pid, none waits at a barrier.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom impruver.lock import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('ready', flush=True)\n    time.sleep(120)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        busy = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                               "2", "--main_process_port", "29534", "-m", "impruver", *TINY, *shared_data,
                               "train.max_steps=2", "hardware=cpu_ddp", "train.batch_size=2", f"output_dir={out}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert busy.returncode != 0 and f"pid {holder.pid}" in busy.stderr, busy.stderr[-3000:]
    assert "the main process stopped" in busy.stderr  # the other rank says why it stops too


def final_weights(output_dir: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return load_file(output_dir / "model.safetensors")


def kill_run(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the run and every process it started, as an out-of-memory killer or a lost machine would.

    torch's launcher starts each worker in a session of its own, so a process-group kill misses them: the
    whole process tree is collected first, then killed.
    """
    import psutil

    root = psutil.Process(proc.pid)
    tree = [root, *root.children(recursive=True)]
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


def test_fsdp_two_ranks_resume_after_a_kill_to_the_same_weights(tmp_path: Path, shared_data: list[str]) -> None:
    """FSDP2 on two CPU processes: sharded state saved, the run killed, resumed == uninterrupted == one process."""
    import torch

    steps = ["train.max_steps=24", "train.save_steps=8", "train.load_best_at_end=false", "train.logging_steps=4"]
    fsdp = [*TINY, *shared_data, *steps, "hardware=cpu_ddp", "hardware.distributed=fsdp", "train.batch_size=2"]
    full = tmp_path / "full"
    run([str(IMPRUVER), *fsdp, f"output_dir={full}"], cwd=tmp_path)
    record = json.loads((full / "run.json").read_text())
    assert record["world_size"] == 2 and record["strategy"]["distributed_type"] == "FSDP"
    assert record["strategy"]["shards"] == ["grads", "optimizer", "params"]

    part = tmp_path / "part"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.Popen([str(IMPRUVER), *fsdp, f"output_dir={part}"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = part / "checkpoints" / "step-00000008"
    deadline = time.monotonic() + 300
    while not (checkpoint / "state.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_run(proc)
    assert (checkpoint / "state.json").is_file(), "the run ended before its first checkpoint"
    assert not (part / "run.json").exists(), "the kill came after the run had finished"
    # Each rank wrote its own shard of the weights and of the optimizer state (torch.distributed.checkpoint).
    assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]
    assert len(list((checkpoint / "optimizer_0").glob("*.distcp"))) == 2

    run([str(IMPRUVER), *fsdp, "train.resume=auto", f"output_dir={part}"], cwd=tmp_path)
    starts = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()
              if '"event": "start"' in line]
    assert starts[-1]["step"] >= 8, "the second run resumed rather than starting over"
    a, b = final_weights(full), final_weights(part)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)

    single = tmp_path / "single"  # the same global batch (2 ranks x 2 rows) in one process, nothing sharded
    run([str(IMPRUVER), *TINY, *shared_data, *steps, "train.batch_size=4", f"output_dir={single}"], cwd=tmp_path)
    c = final_weights(single)
    assert a.keys() == c.keys(), "the gathered weights save like the model's own (tied weights once)"
    for key in a:
        torch.testing.assert_close(a[key], c[key], rtol=1e-4, atol=1e-4)
