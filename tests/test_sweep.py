"""Sweeps (multirun): one folder per sweep, a summary of exactly its jobs, readable at 80 columns; the plan
validated once per job; Hydra's launchers (joblib, submitit) and the optuna sweeper through `impruver -m`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from impruver import cli, jobs
from impruver.sweep import collect, render, varying

IMPRUVER = Path(sys.executable).with_name("impruver")
FAST = ["preset=demo", "train.max_steps=2", "train.logging_steps=1", "train.eval_steps=1000",
        "train.save_steps=1000", "dataset.dedup.near=false"]


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The training stage replaced by a recorder (the real one runs in the integration tests below); counts the
    validations (make_plan calls) and returns a loss that depends on the job's lr, as training would."""
    import impruver.plan

    seen: dict[str, Any] = {"plans": [], "validations": 0}
    make_plan = impruver.plan.make_plan

    def counting(*args: Any, **kwargs: Any) -> Any:
        seen["validations"] += 1
        return make_plan(*args, **kwargs)

    def stage(stage: str, plan: Any, **flags: Any) -> dict[str, Any]:
        seen["plans"].append(plan)
        Path(plan.output_dir).mkdir(parents=True, exist_ok=True)
        return {"steps": 2, "train_loss": 1.0 / plan.train.lr, "eval_loss": abs(plan.train.lr - 3e-3)}

    monkeypatch.setattr(impruver.plan, "make_plan", counting)
    monkeypatch.setattr(jobs, "run_stage", stage)
    monkeypatch.setattr(jobs, "prepare_sweep", lambda plans: None)
    return seen


def test_a_single_run_is_validated_once(recorded: dict[str, Any], tmp_path: Path) -> None:
    assert cli.main(["train", "train.max_steps=2", f"output_dir={tmp_path}"]) == 0
    (plan,) = recorded["plans"]
    assert recorded["validations"] == 1, "the pre-check's plan is the job's plan"
    assert plan.train.max_steps == 2 and plan.output_dir == str(tmp_path)
    assert json.loads((tmp_path / "run_summary.json").read_text())["overrides"][-1] == f"output_dir={tmp_path}"


def test_sweep_summary_holds_exactly_this_sweeps_jobs(recorded: dict[str, Any], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    older = tmp_path / "multirun" / "2020-01-01_00-00-00" / "0_train.lr=1e-9"
    older.mkdir(parents=True)
    (older / "run_summary.json").write_text(json.dumps({"overrides": ["train.lr=1e-9"], "eval_loss": 0.0}))
    argv = ["-m", "train.lr=1e-3,3e-3", "train.max_steps=2", f"output_dir={tmp_path}"]
    assert cli.main(argv) == 0
    assert recorded["validations"] == 2, "each point validated once, before Hydra starts"
    sweeps = sorted(p for p in (tmp_path / "multirun").iterdir() if p.name != "2020-01-01_00-00-00")
    (sweep,) = sweeps
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["jobs"] == 2 and len(summary["runs"]) == 2
    assert [p.output_dir for p in recorded["plans"]] == [r["output_dir"] for r in summary["runs"]]
    assert all(Path(r["output_dir"]).parent == sweep for r in summary["runs"])
    assert [r["best"] for r in summary["runs"]] == [False, True]  # eval loss 0 at lr=3e-3
    assert summary["best"] == summary["runs"][1]["output_dir"]
    out = capsys.readouterr().out
    assert "sweep: 2 runs" in out and "lr=0.003" in out


def test_a_bad_trial_is_reported_and_the_sweep_goes_on(recorded: dict[str, Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Points a sweeper proposes while it runs (optuna) are planned when they start: a bad one is recorded as
    failed (exit status 2, its problems), with a NaN objective, and the next trial runs."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from impruver.compose import Precheck, compose, make_job

    job = make_job("train", {}, Precheck(listable=False), None, jobs.run_job)

    class Runtime:  # the parts of HydraConfig.get() a job reads, as a multirun job sees them
        def __init__(self, num: int, overrides: list[str]) -> None:
            self.mode = RunMode.MULTIRUN
            self.runtime = OmegaConf.create({"choices": {"model": "tiny"}, "output_dir": str(tmp_path / str(num))})
            self.overrides = OmegaConf.create({"task": overrides})

    good = compose(["train.lr=1e-3"]).config
    bad = {**good, "train": {**good["train"], "lr": -1}}  # what optuna could propose from a bad search space
    results = []
    for num, (config, overrides) in enumerate([(bad, ["train.lr=-1"]), (good, ["train.lr=1e-3"])]):
        monkeypatch.setattr("hydra.core.hydra_config.HydraConfig.get", lambda n=num, o=overrides: Runtime(n, o))
        results.append(job(OmegaConf.create(config)))
    assert results[0] != results[0]  # NaN: optuna marks the trial failed and asks for the next
    assert results[1] == pytest.approx(abs(1e-3 - 3e-3))
    failed = json.loads((tmp_path / "0" / "run_summary.json").read_text())
    assert failed["exit_code"] == 2 and "train.lr" in failed["error"]
    summary = collect(tmp_path)
    assert summary["jobs"] == 2 and summary["best"] == str(tmp_path / "1")


def test_the_table_shows_what_differs_at_80_columns(tmp_path: Path) -> None:
    from rich.console import Console

    shared = ["preset=rugpt3large/760M_lora_saiga2", "hardware=gpu24gb", "train.max_steps=200"]
    for num, (lr, r) in enumerate([("0.0001", 8), ("0.0003", 16), ("0.0024269323663679908", 32)]):
        job = tmp_path / f"{num}_x"
        job.mkdir()
        (job / "run_summary.json").write_text(json.dumps({
            "overrides": [*shared, f"train.lr={lr}", f"method.lora.r={r}"], "steps": 200, "train_loss": 2.0 - num,
            "eval_loss": 2.1 - num, "tokens_per_s": 12345.6, "elapsed_s": 1234.5}))
    summary = collect(tmp_path)
    assert varying(summary["runs"]) == ["lr=0.0001 r=8", "lr=0.0003 r=16", "lr=0.002427 r=32"]
    console = Console(width=80, record=True, color_system=None)
    console.print(render(summary))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = [line for line in lines if "lr=" in line]
    assert len(rows) == 3 and all("train.lr" not in row for row in rows)
    assert "lr=0.0003 r=16" in rows[1] and "best" in rows[2]


def test_submitit_slurm_settings_of_the_readme_compose(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's SLURM line is valid Hydra (no `hydra: unknown key`); --cfg hydra shows it without submitting."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    argv = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=1",
            "hydra.launcher.gpus_per_node=8", "hydra.launcher.tasks_per_node=1", "hydra.launcher.timeout_min=720",
            "preset=rugpt3large/760M_lora_fc", "hardware=ddp", "hardware.num_processes=8", "--cfg", "hydra"]
    assert cli.main(argv) == 0
    hydra_cfg = yaml.safe_load(capsys.readouterr().out)["hydra"]
    assert hydra_cfg["runtime"]["choices"]["hydra/launcher"] == "submitit_slurm"
    assert hydra_cfg["launcher"]["partition"] == "gpu" and hydra_cfg["launcher"]["timeout_min"] == 720
    assert not hydra_cfg.get("callbacks"), "impruver configures no callback: the summary runs from the CLI"
    assert cli.main([*argv[:-2], "method.lora.r=32", "--cfg", "job"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["method"]["lora"]["r"] == 32 and job["hardware"]["num_processes"] == 8


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def the_sweep(output_dir: Path) -> tuple[Path, dict[str, Any]]:
    (sweep,) = (output_dir / "multirun").iterdir()
    return sweep, json.loads((sweep / "sweep_summary.json").read_text())


@pytest.mark.integration
def test_joblib_sweep_runs_both_jobs(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    out = tmp_path / "sweep"
    run([str(IMPRUVER), "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *FAST, "train.lr=1e-3,3e-3",
         f"output_dir={out}"], cwd=tmp_path)
    sweep, summary = the_sweep(out)
    assert summary["jobs"] == 2 and sum(r["best"] for r in summary["runs"]) == 1
    lrs = [next(o for o in r["overrides"] if o.startswith("train.lr=")) for r in summary["runs"]]
    assert [float(v.split("=")[1]) for v in lrs] == [1e-3, 3e-3]
    for r in summary["runs"]:
        job = Path(r["output_dir"])
        assert job.parent == sweep and (job / "model.safetensors").is_file()
        assert yaml.safe_load((job / "plan.yaml").read_text())["output_dir"] == str(job)
    losses = [r["eval_loss"] for r in summary["runs"]]
    assert summary["best"] == summary["runs"][losses.index(min(losses))]["output_dir"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"], "no stray folders in the working directory"


@pytest.mark.integration
def test_optuna_sweep_of_two_trials(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    out = tmp_path / "opt"
    run([str(IMPRUVER), "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=1",
         "train.lr=interval(1e-4,1e-2)", *FAST, f"output_dir={out}"], cwd=tmp_path)
    _, summary = the_sweep(out)
    assert summary["jobs"] == 2
    lrs = [float(next(o for o in r["overrides"] if o.startswith("train.lr=")).split("=")[1])
           for r in summary["runs"]]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and lrs[0] != lrs[1]
    assert all(isinstance(r["eval_loss"], float) for r in summary["runs"])
