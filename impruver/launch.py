"""Multi-process runs through `accelerate launch`: compose once, freeze the plan, start workers that read it.

impruver never implements its own distributed layer. For a plan whose hardware asks for more than one process,
the main job composes and validates the config once, composes the dataset once, writes ``plan.yaml``, and then
runs ``accelerate launch ... -m impruver.worker <plan.yaml>`` on this machine. Every worker reads the frozen plan
(workers never re-run Hydra) and trains under accelerate (DDP, FSDP or DeepSpeed). When impruver itself is
started by a launcher (``accelerate launch -m impruver ...``, torchrun), it runs in place instead.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from impruver.errors import RunError
from impruver.layout import RunLayout
from impruver.lock import process_start
from impruver.plan import Plan
from impruver.strategies import strategy_of

LAUNCHER_ENV = ("LOCAL_RANK", "ACCELERATE_PROCESS_INDEX")  # set in every process a launcher starts


def total_processes(plan: Plan) -> int:
    return plan.hardware.num_processes * plan.hardware.num_machines


def under_launcher() -> bool:
    """This process was started by accelerate launch / torchrun (one of several ranks)."""
    return any(v in os.environ for v in LAUNCHER_ENV)


def needs_launch(plan: Plan) -> bool:
    """Start workers through accelerate (rather than train in this process).

    Several processes always are; one process is when its strategy shards (FSDP, DeepSpeed work through a process
    group's collectives, which only a launcher sets up).
    """
    if under_launcher():
        return False
    return total_processes(plan) > 1 or strategy_of(plan).needs_launcher


def launch_command(plan: Plan, plan_path: str | os.PathLike[str]) -> list[str]:
    """The `accelerate launch` command line that runs the plan's workers on this machine."""
    hw = plan.hardware
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--num_processes", str(total_processes(plan)),
           "--num_machines", str(hw.num_machines),
           "--mixed_precision", hw.mixed_precision,
           "--dynamo_backend", "no"]
    if hw.num_machines > 1:
        cmd += ["--machine_rank", str(hw.machine_rank), "--main_process_ip", str(hw.main_process_ip),
                "--main_process_port", str(hw.main_process_port)]
    else:
        cmd += ["--main_process_port", str(hw.main_process_port or free_port())]
    cmd += strategy_of(plan).launch_args(plan)  # --multi_gpu, --use_fsdp ..., --use_deepspeed ...
    return [*cmd, "-m", "impruver.worker", str(plan_path)]


def free_port() -> int:
    """A TCP port nothing listens on now, for one machine's rendezvous. The OS picks it; a fixed default port can
    still be held (or half-closed) by the workers of a run killed a moment ago, and a relaunch on it aborted."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_env(plan: Plan) -> dict[str, str]:
    env = dict(os.environ)
    if plan.hardware.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # gloo, and every rank on the CPU
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.hardware.num_processes)))
    return env


def describe(plan: Plan) -> dict[str, Any]:
    """The launch as `impruver plan` shows it."""
    strategy = strategy_of(plan)
    return {
        "processes": total_processes(plan),
        "machines": plan.hardware.num_machines,
        "sharding": strategy.name,
        "shards": sorted(strategy.shards),
        "command": shlex.join(launch_command(plan, RunLayout.of(plan.output_dir).plan))
        if total_processes(plan) > 1 or strategy.needs_launcher else None,
    }


def spawn(plan: Plan) -> dict[str, Any]:
    """Run the plan's workers through accelerate and wait for them; the plan must already be written."""
    plan_path = RunLayout.of(plan.output_dir).plan
    if not plan_path.is_file():
        raise RunError(f"no frozen plan at {plan_path}: the main process writes it before launching workers")
    cmd = launch_command(plan, plan_path)
    from impruver.ui import log

    log.info("launching %d processes: %s", total_processes(plan), shlex.join(cmd))
    returncode = run_workers(cmd, launch_env(plan))
    if returncode != 0:
        raise RunError(f"the distributed run failed (exit status {returncode}); its workers' output is "
                       f"above. Relaunch with: {shlex.join(cmd)}")
    return {"world_size": total_processes(plan), "plan": str(plan_path)}


# -- the workers' lifetime is this process's ------------------------------------------------------------------
# torch's launcher starts each worker in a session of its own, so a signal to impruver's process group never
# reaches them: without this, killing `impruver` (SIGTERM from a scheduler, Ctrl+C) leaves the workers training.

STOP_GRACE_S = 15.0  # how long the launcher gets to stop its workers before everything left is killed


def run_workers(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher and wait for it; return its exit status.

    SIGTERM and SIGINT received meanwhile are forwarded to the launcher, which stops its workers; whatever of
    them is still running when this returns or raises (an error, a second signal) is killed.

    Raises:
        Interrupted: a signal stopped the run (exit status 128 + its number).
    """
    proc = subprocess.Popen(cmd, env=env)
    received: list[int] = []
    family: dict[int, int | None] = {}  # the launcher's processes seen while it ran: pid -> start time

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        if proc.poll() is None:  # not reaped yet, so its pid is still its own
            family.update(_snapshot(proc.pid))
            proc.send_signal(signal.SIGTERM)  # torch's agent stops every worker on SIGTERM

    previous = _handle((signal.SIGTERM, signal.SIGINT), forward)
    try:
        code = proc.wait()
    finally:
        try:
            _stop(proc, family)
        finally:
            _handle(previous, None)
    if received:
        raise Interrupted(received[0])
    return code


def _handle(signals: Any, handler: Any) -> dict[int, Any]:
    """Install ``handler`` for ``signals`` (or restore a {signal: handler} mapping); returns the old ones.
    Python takes signals only in the main thread: elsewhere nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    pairs = signals.items() if isinstance(signals, dict) else ((s, handler) for s in signals)
    return {sig: signal.signal(sig, new) for sig, new in pairs}


def _stop(proc: subprocess.Popen[Any], family: dict[int, int | None]) -> None:
    """Stop the launcher and every process under it: SIGTERM, a grace period, then SIGKILL for what is left.

    Only processes seen under the launcher while it ran are killed, and only if they are still the same ones
    (same start time): a pid freed by an ended worker may belong to an unrelated process by now.
    """
    if proc.poll() is None:
        family.update(_snapshot(proc.pid))  # its workers, before they could be re-parented out of reach
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)
        if proc.poll() is None:
            family.update(_snapshot(proc.pid))
            proc.kill()
            proc.wait()
    for pid, started in family.items():
        if started is not None and process_start(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _snapshot(pid: int) -> dict[int, int | None]:
    return {child: process_start(child) for child in descendants(pid)}


def descendants(pid: int) -> list[int]:
    """Every live process under ``pid`` (children, grandchildren, ...), read from /proc; [] where there is none."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
        except OSError:
            continue  # ended while we looked
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Interrupted(RunError):
    """The run was stopped by a signal; its workers were stopped with it."""

    def __init__(self, signum: int) -> None:
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}: the workers were stopped too; continue "
                         "from the last checkpoint with train.resume=auto")


@contextlib.contextmanager
def ranks_lock(plan: Plan) -> Iterator[None]:
    """Under an outside launcher (a bare ``accelerate launch -m impruver``): the main process holds the run folder's
    lock for the whole run, as ``impruver`` itself does; every rank learns whether it got it, so a busy folder stops
    all of them with the holder's pid instead of leaving the others waiting at the first barrier."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from impruver.lock import run_lock

    state = PartialState(cpu=plan.hardware.device == "cpu")
    held = contextlib.ExitStack()
    problem: list[str | None] = [None]
    if state.is_main_process:
        try:
            held.enter_context(run_lock(plan.output_dir))
        except RunError as exc:
            problem = [str(exc)]
    if state.num_processes > 1:
        broadcast_object_list(problem)  # the main process's answer, on every rank
    if problem[0] is not None:
        held.close()
        raise RunError(problem[0] if state.is_main_process else f"the main process stopped: {problem[0]}")
    with held:
        yield


def prepare_ranks(plan: Plan) -> None:
    """Under an outside launcher: the main process composes the data and writes the plan; the others wait."""
    from accelerate import PartialState

    state = PartialState(cpu=plan.hardware.device == "cpu")
    if state.is_main_process:
        from impruver.data.pipeline import ensure_composed

        ensure_composed(plan)
        plan.write()
    state.wait_for_everyone()
