"""Killing `impruver` stops its workers: a real two-process CPU run (accelerate launch, DDP on gloo) whose parent
gets SIGTERM leaves no process behind (torch's launcher starts the workers in sessions of their own, so nothing
reaches them unless the parent passes the signal on)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_support import prepare, tiny_plan

from impruver.launch import descendants

pytestmark = pytest.mark.integration

PARENT = """import sys
from impruver.errors import ImpruverError
from impruver.launch import spawn
from impruver.plan import load_plan
try:
    spawn(load_plan(sys.argv[1]))
except ImpruverError as exc:
    print(exc, file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits to be read


def _trained_a_step(out: Path) -> bool:
    metrics = out / "metrics.jsonl"
    return metrics.is_file() and any(json.loads(line)["event"] == "train"
                                     for line in metrics.read_text().splitlines() if line.strip())


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the workers through /proc (Linux)")
def test_sigterm_to_the_parent_stops_every_worker(tmp_path: Path) -> None:
    from impruver.data.pipeline import TOKENIZER_DIR

    out = prepare(tmp_path / "run")
    shutil.copytree(out / "tok", out / "data" / TOKENIZER_DIR)  # where workers read the composed tokenizer
    plan = tiny_plan(out, train={"max_steps": 100_000, "save_steps": None, "eval_steps": None, "logging_steps": 1})
    plan = plan.model_copy(update={"hardware": plan.hardware.model_copy(update={
        "num_processes": 2, "distributed": "ddp", "main_process_port": _free_port()})})
    path = plan.write()
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(path)], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not _trained_a_step(out):
            assert parent.poll() is None and time.monotonic() < deadline, parent.stderr.read()[-3000:]
            time.sleep(0.5)
        family = descendants(parent.pid)
        workers = [p for p in family if "impruver.worker" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(workers) >= 2, family  # the launcher, then one process per rank
        parent.send_signal(signal.SIGTERM)
        code = parent.wait(timeout=60)
        err = parent.stderr.read()
        assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in err and "train.resume=auto" in err, err
        deadline = time.monotonic() + 10
        while any(_running(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in family if _running(p)], "processes left after the parent was stopped"
    finally:
        for pid in [parent.pid, *descendants(parent.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
