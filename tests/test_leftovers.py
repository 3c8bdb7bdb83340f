"""No tracebacks, no leftovers: environment failures exit 2 with the fix, one run per output_dir, and what a
killed run leaves behind is removed by the next one."""

from __future__ import annotations

import errno
import inspect
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_support import prepare, tiny_plan, use_files  # noqa: F401  (fixture)

from impruver import cli, lock
from impruver.errors import RunError
from impruver.layout import RunLayout

# A process that takes a run folder's lock and starts composing there (a work folder as the pipeline makes it),
# then waits: killed with SIGKILL, it leaves both behind, as a compose killed with kill -9 does.
HOLDER = """import sys, tempfile, time
from pathlib import Path
from impruver.lock import run_lock
with run_lock(sys.argv[1]) as root:
    (root / "data").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".compose-", dir=root / "data"))
    (work / "shard-00000.jsonl").write_text("{}")
    print("ready", flush=True)
    time.sleep(120)
"""


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run the command line in this process; its log goes to this test's captured stderr (not an earlier one's)."""
    log = logging.getLogger("impruver")
    handlers, log.handlers = log.handlers, []
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        log.handlers = handlers
    return code, capsys.readouterr().err


def _plan_file(out: Path, folder: Path, **train: object) -> Path:
    return tiny_plan(out, train={"max_steps": 2, "save_steps": None, "eval_steps": None, **train}).write(folder)


def test_a_second_run_on_a_busy_output_dir_exits_2_naming_the_pid(tmp_path: Path, use_files, capsys) -> None:
    out = prepare(tmp_path / "run")
    plan_file = _plan_file(out, tmp_path / "plan")
    holder = _holder(out)
    try:
        code, err = _cli(capsys, "train", "--plan", str(plan_file))
        assert lock.holder(out)["pid"] == holder.pid  # what chat asks before saying a run is in progress
    finally:
        holder.kill()
        holder.wait()
    assert lock.holder(out) is None  # killed: its lock no longer counts
    assert code == 2 and f"pid {holder.pid}" in err and "Traceback" not in err, err
    assert not (out / "model.safetensors").exists()
    assert list((out / "data").glob(".compose-*")), "a live run's work folder is not touched"


def test_a_killed_runs_lock_and_work_files_are_removed_by_the_next_run(tmp_path: Path, use_files, capsys) -> None:
    out = prepare(tmp_path / "run")
    plan_file = _plan_file(out, tmp_path / "plan")
    holder = _holder(out)
    holder.kill()  # SIGKILL: nothing is cleaned up
    holder.wait()
    (out / "checkpoints" / ".step-00000005.tmp").mkdir(parents=True)  # a checkpoint being written
    (out / ".run.json.tmp4242").write_text("{")  # an atomic write cut short
    layout = RunLayout.of(out)
    assert layout.lock.is_file() and len(layout.stale_work()) == 3
    code, err = _cli(capsys, "train", "--plan", str(plan_file))
    assert code == 0, err
    assert layout.stale_work() == [] and not layout.lock.exists()
    assert (out / "model.safetensors").is_file() and (out / "data" / "train.jsonl").is_file()
    assert "taking over" in err and f"pid {holder.pid}" in err, err  # the stale lock is reported


def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return locked / "run"
    return Path("/sys/impruver-test-unwritable/run")  # sysfs refuses new folders even to root


@pytest.mark.parametrize("kind", ["a file", "unwritable"])
def test_an_unusable_output_dir_exits_2_with_the_fix(kind: str, tmp_path: Path, use_files, capsys) -> None:
    if kind == "a file":
        out = tmp_path / "taken"
        out.write_text("not a folder")
    else:
        out = _unwritable(tmp_path)
    plan_file = _plan_file(out, tmp_path / "plan")
    code, err = _cli(capsys, "train", "--plan", str(plan_file))
    assert code == 2 and f"output_dir {out}" in err and "output_dir=PATH" in err and "Traceback" not in err, err
    if kind == "a file":
        assert out.read_text() == "not a folder"
    assert not out.is_dir()


def test_a_malformed_plan_yaml_exits_2_in_a_worker_and_with_plan(tmp_path: Path, capsys) -> None:
    from impruver import worker

    bad = tmp_path / "plan.yaml"
    bad.write_text("version: 2\ntrain: {lr: [1, 2\n")
    assert worker.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML at line 3" in err and str(bad) in err and "Traceback" not in err, err
    code, err = _cli(capsys, "train", "--plan", str(bad))
    assert code == 2 and "not valid YAML" in err


def test_a_full_disk_is_a_message_and_leaves_no_half_checkpoint(tmp_path: Path, use_files, monkeypatch,
                                                                capsys) -> None:
    import torch

    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if str(f).endswith(".pt") and ".tmp" in str(f):  # the checkpoint's files: the disk fills up there
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    out = prepare(tmp_path / "run")
    plan_file = _plan_file(out, tmp_path / "plan", max_steps=4, save_steps=2)
    code, err = _cli(capsys, "train", "--plan", str(plan_file))
    assert code == 2 and "the disk is full" in err and "train.resume=auto" in err and "Traceback" not in err, err
    assert not list((out / "checkpoints").iterdir()) and not RunLayout.of(out).lock.exists()


# Runs `impruver ARGV` under a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored): the kernel then fails a write past
# the limit with EFBIG, through whichever library makes it (safetensors' Rust I/O, torch.save's C++ writer), as a
# full disk fails it with ENOSPC. No monkeypatching: the libraries' own errors are what the user would see.
LIMITED = """import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from transformers import AutoTokenizer
import impruver.data.pipeline as pipeline
from impruver import cli
pipeline.ensure_composed = lambda plan, **_: None  # the test wrote the rows (as the use_files fixture does)
pipeline.load_composed_tokenizer = lambda plan: AutoTokenizer.from_pretrained(plan.tokenizer.path)
sys.exit(cli.main(sys.argv[2:]))
"""


# the weights (safetensors, 160 kB) fail first; then the optimizer state (torch.save)
@pytest.mark.parametrize("limit", [20_000, 200_000])
def test_a_real_failed_write_inside_a_library_is_a_message_not_a_traceback(tmp_path: Path, limit: int) -> None:
    out = prepare(tmp_path / "run")
    plan_file = _plan_file(out, tmp_path / "plan", max_steps=4, save_steps=2)
    (tmp_path / "unused.jsonl").write_text("")  # the plan's nominal source (its rows are written by prepare)
    done = subprocess.run([sys.executable, "-c", LIMITED, str(limit), "train", "--plan", str(plan_file)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    message = " ".join(done.stderr.split())
    assert "ulimit -f" in message and "train.resume=auto" in message, message[-2000:]
    assert not list((out / "checkpoints").iterdir()), "a half-written checkpoint was left"
    assert not RunLayout.of(out).lock.exists()


def test_library_write_failures_are_told_apart_from_other_errors() -> None:
    from impruver.files import library_write_failure

    class SafetensorError(Exception):  # safetensors' Rust error type, by name (its module is private)
        pass

    full = library_write_failure(SafetensorError("Error while serializing: I/O error: No space left on device "
                                                 "(os error 28)"), "/runs/a")
    assert full is not None and full.startswith("the disk is full: writing a file under /runs/a failed")
    torch_full = library_write_failure(RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                    "PytorchStreamWriter failed writing file data/0: file write failed"))
    assert torch_full is not None and "GiB free there now" in torch_full
    assert library_write_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert library_write_failure(ValueError("os error 28")) is None


def test_the_compose_stage_takes_the_pipelines_flags() -> None:
    from impruver import jobs
    from impruver.data import pipeline

    def flags(fn) -> dict[str, object]:
        return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}

    assert flags(jobs.compose_job) == flags(pipeline.run)  # compose_job only adds the lock around it


def test_the_lock_is_reentrant_and_released(tmp_path: Path) -> None:
    from impruver.lock import owner_of, run_lock

    with run_lock(tmp_path / "run") as root:
        with run_lock(root):
            assert owner_of(RunLayout.of(root).lock)["pid"] == os.getpid()
        assert RunLayout.of(root).lock.exists()  # still held by the outer block
    assert not RunLayout.of(root).lock.exists()
    (tmp_path / "f").write_text("")
    with pytest.raises(RunError, match="is a file"):
        with run_lock(tmp_path / "f"):
            pass
