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
from pathlib import Path
from typing import Any

from impruver.errors import RunError
from impruver.plan import Plan

LAUNCHER_ENV = ("LOCAL_RANK", "ACCELERATE_PROCESS_INDEX")  # set in every process a launcher starts


def total_processes(plan: Plan) -> int:
    return plan.hardware.num_processes * plan.hardware.num_machines


def under_launcher() -> bool:
    """This process was started by accelerate launch / torchrun (one of several ranks)."""
    return any(v in os.environ for v in LAUNCHER_ENV)


def needs_launch(plan: Plan) -> bool:
    """Start workers through accelerate (rather than train in this process)."""
    return total_processes(plan) > 1 and not under_launcher()


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
    if hw.distributed == "fsdp":
        opts = {"fsdp_sharding_strategy": "FULL_SHARD", "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "fsdp_activation_checkpointing": True, **hw.options}
        cmd += ["--use_fsdp"]
        for key, value in opts.items():
            cmd += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    elif hw.distributed.startswith("deepspeed"):
        cmd += ["--use_deepspeed", "--zero_stage", hw.distributed[-1]]
    else:
        # --multi_gpu is accelerate's switch for multi-process data parallel, on CPUs (gloo) as well:
        # `--cpu --num_processes 2` silently starts a single process in accelerate 1.15.
        cmd += ["--multi_gpu"]
    return [*cmd, "-m", "impruver.worker", str(plan_path)]


def launch_env(plan: Plan) -> dict[str, str]:
    env = dict(os.environ)
    if plan.hardware.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # gloo, and every rank on the CPU
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.hardware.num_processes)))
    return env


def describe(plan: Plan) -> dict[str, Any]:
    """The launch as `impruver plan` shows it."""
    plan_path = Path(plan.output_dir, "plan.yaml")
    return {
        "processes": total_processes(plan),
        "machines": plan.hardware.num_machines,
        "sharding": plan.hardware.distributed,
        "command": shlex.join(launch_command(plan, plan_path)) if total_processes(plan) > 1 else None,
    }


def spawn(plan: Plan) -> dict[str, Any]:
    """Run the plan's workers through accelerate and wait for them; the plan must already be written."""
    plan_path = Path(plan.output_dir, "plan.yaml")
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
