"""Scale-out: launch plans for several processes and machines, Hydra launchers, sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from impruver import cli, launch
from impruver.compose import compose
from impruver.plan import Plan, make_plan
from impruver.sweep import collect


def plan_of(*overrides: str) -> Plan:
    composed = compose(list(overrides))
    return make_plan(composed.config, choices=composed.choices)


def test_multinode_plan_shows_the_accelerate_launch(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "hardware=multinode", "hardware.num_machines=2", "hardware.machine_rank=0",
            "hardware.main_process_ip=10.0.0.1", "model=rugpt3large", "method=full", "dataset=saiga2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "16 processes on 2 machine(s)" in out
    assert "--num_machines 2" in out and "--machine_rank 0" in out and "--main_process_ip 10.0.0.1" in out
    assert "-m impruver.worker outputs/rugpt3large_full_saiga2/plan.yaml" in out
    assert "estimated peak GPU memory per device" in out


def test_launch_commands_per_profile() -> None:
    ddp = launch.launch_command(plan_of("hardware=ddp", "hardware.num_processes=4", "model=rugpt3small",
                                        "method=full", "dataset=saiga2"), "p.yaml")
    assert ddp[ddp.index("--num_processes") + 1] == "4" and "--multi_gpu" in ddp
    fsdp = launch.launch_command(plan_of("hardware=fsdp", "model=rugpt3large", "method=full", "dataset=saiga2"),
                                 "p.yaml")
    assert "--use_fsdp" in fsdp and fsdp[fsdp.index("--fsdp_version") + 1] == "2"
    assert fsdp[fsdp.index("--fsdp_reshard_after_forward") + 1] == "true"
    assert fsdp[fsdp.index("--fsdp_activation_checkpointing") + 1] == "true"
    assert fsdp[fsdp.index("--fsdp_state_dict_type") + 1] == "SHARDED_STATE_DICT"
    zero3 = launch.launch_command(plan_of("hardware=deepspeed_zero3", "model=rugpt3large", "method=full",
                                          "dataset=saiga2"), "p.yaml")
    assert zero3[zero3.index("--zero_stage") + 1] == "3"
    one_fsdp = plan_of("hardware=fsdp", "hardware.num_processes=1", "model=rugpt3large", "method=full",
                       "dataset=saiga2")
    assert launch.needs_launch(one_fsdp), "sharding needs a process group even for one GPU"
    cpu = plan_of("hardware=cpu_ddp")
    assert launch.needs_launch(cpu) and "--multi_gpu" in launch.launch_command(cpu, "p.yaml")
    assert launch.launch_env(cpu)["ACCELERATE_USE_CPU"] == "true"
    assert not launch.needs_launch(plan_of())


def test_one_machine_rendezvous_on_a_free_port_unless_one_is_set() -> None:
    """A fixed default port can still be held by the workers of a run killed a moment ago (a relaunch on it then
    aborts), so one machine takes a port the OS says is free at each launch; a set port is honoured, and several
    machines must set the same one."""
    import socket

    def port(cmd: list[str]) -> int:
        return int(cmd[cmd.index("--main_process_port") + 1])

    cpu = plan_of("hardware=cpu_ddp")
    assert cpu.hardware.main_process_port is None
    with socket.socket() as held:  # the port a killed run's store may still hold
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        picked = {port(launch.launch_command(cpu, "p.yaml")) for _ in range(3)}
    assert taken not in picked
    assert port(launch.launch_command(plan_of("hardware=cpu_ddp", "hardware.main_process_port=29533"), "p")) == 29533
    with pytest.raises(Exception, match="hardware.main_process_port"):
        plan_of("hardware=multinode", "hardware.main_process_ip=10.0.0.1", "hardware.main_process_port=null",
                "model=rugpt3large", "method=full", "dataset=saiga2")


def test_sharding_lowers_the_per_device_estimate() -> None:
    single = plan_of("hardware=gpu80gb", "model=rugpt3large", "method=full", "dataset=saiga2")
    fsdp = plan_of("hardware=fsdp", "hardware.num_processes=8", "model=rugpt3large", "method=full",
                   "dataset=saiga2")
    assert fsdp.memory.optimizer_gib == pytest.approx(single.memory.optimizer_gib / 8, rel=0.01)
    assert fsdp.memory.total_gib < single.memory.total_gib


def test_multinode_needs_the_main_address() -> None:
    from impruver.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        plan_of("hardware=multinode", "hardware.machine_rank=2")
    text = str(info.value)
    assert "hardware.main_process_ip" in text and "hardware.machine_rank" in text


def test_sweep_summary_marks_the_best(tmp_path: Path) -> None:
    for num, (lr, best) in enumerate([("1e-3", 2.5), ("3e-3", 2.1), ("1e-2", float("nan"))]):
        job = tmp_path / f"{num}_train.lr={lr}"
        job.mkdir()
        (job / "run_summary.json").write_text(json.dumps({"overrides": [f"train.lr={lr}"], "eval_loss": best,
                                                          "train_loss": best + 0.1, "tokens_per_s": 100.0}))
    summary = collect(tmp_path)
    assert summary["jobs"] == 3
    assert summary["best"] == str(tmp_path / "1_train.lr=3e-3")
    assert [r["best"] for r in summary["runs"]] == [False, True, False]
