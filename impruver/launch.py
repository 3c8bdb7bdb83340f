"""Multi-process runs through `accelerate launch`: compose once, freeze the plan, start workers that read it.

impruver never implements its own distributed layer. For a plan whose hardware asks for more than one process,
the main job composes and validates the config once, composes the dataset once, writes ``plan.yaml``, and then
runs ``accelerate launch ... -m impruver.worker <plan.yaml>`` on this machine. Every worker reads the frozen plan
(workers never re-run Hydra) and trains under accelerate (DDP, FSDP or DeepSpeed). When impruver itself is
started by a launcher (``accelerate launch -m impruver ...``, torchrun), it runs in place instead.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Any

from impruver.errors import RunError
from impruver.layout import RunLayout
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
        cmd += ["--main_process_port", str(hw.main_process_port)]
    cmd += strategy_of(plan).launch_args(plan)  # --multi_gpu, --use_fsdp ..., --use_deepspeed ...
    return [*cmd, "-m", "impruver.worker", str(plan_path)]


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
    result = subprocess.run(cmd, env=launch_env(plan))
    if result.returncode != 0:
        raise RunError(f"the distributed run failed (exit status {result.returncode}); its workers' output is "
                       f"above. Relaunch with: {shlex.join(cmd)}")
    return {"world_size": total_processes(plan), "plan": str(plan_path)}


def prepare_ranks(plan: Plan) -> None:
    """Under an outside launcher: the main process composes the data and writes the plan; the others wait."""
    from accelerate import PartialState

    state = PartialState(cpu=plan.hardware.device == "cpu")
    if state.is_main_process:
        from impruver.data.pipeline import ensure_composed

        ensure_composed(plan)
        plan.write()
    state.wait_for_everyone()
