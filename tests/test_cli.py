"""The `impruver` command: Hydra's flags, planning, listing, copying, and exit status 2 for bad configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from impruver import cli
from impruver.compose import list_options

CATALOGUE_COUNT = 12
PREFERENCE_PRESETS = 2  # rugpt3large/760M_lora_saiga2_{dpo,orpo}: DPO and ORPO on the 760M SFT output


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # Hydra's --help / --info end with sys.exit
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cfg_job_prints_the_composed_config(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "model=rugpt3large", "method=lora", "dataset=saiga2", "--cfg", "job")
    assert code == 0
    config = yaml.safe_load(out)
    assert config["model"]["path"] == "ai-forever/rugpt3large_based_on_gpt2"
    assert config["method"]["lora"]["r"] == 16
    assert list(tmp_path.iterdir()) == [], "Hydra must not write outputs/ or .hydra into the working directory"
    assert Path.cwd() == tmp_path


def test_plan_prints_the_validated_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "plan", "model=rugpt3large", "method=lora", "dataset=saiga2")
    assert code == 0
    assert "ai-forever/rugpt3large_based_on_gpt2" in out and "estimated peak GPU memory" in out
    code, out, _ = run_cli(capsys, "plan", "--yaml", "model=rugpt3large", "method=lora", "dataset=saiga2")
    assert yaml.safe_load(out)["method"]["lora"]["r"] == 16


@pytest.mark.parametrize(("argv", "expected"), [
    (["model=rugpt3lage"], ["rugpt3large"]),
    (["method.lora.rr=8", "train.lr=abc"], ["method.lora.rr", "'r'", "train.lr", "abc"]),
    (["plan", "model=rugpt3lage"], ["rugpt3large"]),
    (["-m", "train.lr=1e-3,abc"], ["train.lr", "abc"]),
    (["train", "--promt", "x"], ["--prompt"]),
    (["chat", "--inspect", "3"], ["impruver chat takes no such flag", "--prompt"]),
    (["--yaml"], ["impruver takes no such flag", "--force"]),
    (["run", "finetun"], ["finetune"]),
    (["run", "finetune", "--config", "ruGPT-3.5/13B_lora_saiga"], ["ruGPT-3.5/13B_lora_saiga2"]),
])
def test_configuration_errors_exit_2_naming_every_problem(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                          expected: list[str]) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert "Traceback" not in out + err
    for text in expected:
        assert text in err


def test_ls_lists_presets_and_components(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "ls")
    assert code == 0
    presets = list_options("preset")
    assert len(presets) == CATALOGUE_COUNT + PREFERENCE_PRESETS + 1  # + demo
    for name in presets:
        assert name in out
    for section in ("formats", "models", "tokenizers", "methods", "templates", "optimizers", "schedulers"):
        assert section in out
    assert "impruver" in out  # the providing package


def test_cp_then_plan_the_copy(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    dest = tmp_path / "x.yaml"
    code, out, _ = run_cli(capsys, "cp", "ruGPT-3.5/13B_lora_saiga2", str(dest))
    assert code == 0 and dest.is_file()
    text = dest.read_text(encoding="utf-8")
    assert text.startswith("# Copied from impruver preset ruGPT-3.5/13B_lora_saiga2")
    code, out, _ = run_cli(capsys, "plan", "--yaml", "--config", str(dest), "train.lr=1e-5")
    assert code == 0
    plan = yaml.safe_load(out)
    assert plan["model"]["path"] == "ai-forever/ruGPT-3.5-13B" and plan["train"]["lr"] == 1e-5
    assert plan["preset"] == "ruGPT-3.5/13B_lora_saiga2"
    code, _, err = run_cli(capsys, "cp", "ruGPT-3.5/13B_lora_saiga2", str(dest))
    assert code == 2 and "exists" in err  # never overwrites an edited copy


def test_broken_config_file_names_the_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  builder: hf\n  path: x/y\n  dtyp: bf16\ntrain:\n  lr: fast\n")
    code, _, err = run_cli(capsys, "plan", "--config", str(bad))
    assert code == 2 and str(bad) in err and "model.dtyp" in err and "train.lr" in err


def test_run_form_maps_to_stages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[tuple[str, cli.Args]] = []
    monkeypatch.setattr(cli, "launch", lambda stage, args: seen.append((stage, args)) or 0)
    cfg = tmp_path / "my.yaml"
    cfg.write_text("seed: 1\n")
    assert cli.main(["run", "finetune", "--config", "demo", "--report-to=wandb", "train.lr=1e-3"]) == 0
    assert cli.main(["run", "chat", str(cfg)]) == 0
    assert cli.main(["run", "compose_dataset", "--config", "demo"]) == 0
    (stage, args), (chat_stage, chat_args), (compose_stage, _) = seen
    assert stage == "main" and args.flags["config"] == "demo" and args.flags["report_to"] == "wandb"
    assert "train.lr=1e-3" in args.overrides
    assert chat_stage == "chat" and chat_args.flags["config"] == str(cfg)
    assert compose_stage == "compose"


def test_report_to_reaches_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "run", "finetune", "--config", "demo", "--report-to=wandb", "--cfg", "job")
    assert code == 0 and yaml.safe_load(out)["train"]["report_to"] == ["wandb"]
    code, out, _ = run_cli(capsys, "--report-to", "tensorboard", "--cfg", "job")
    assert code == 0 and yaml.safe_load(out)["train"]["report_to"] == ["tensorboard"]
    code, _, err = run_cli(capsys, "chat", "--report-to=wandb")
    assert code == 2 and "impruver chat takes no such flag" in err


def test_hydra_info_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--info", "searchpath")
    assert code == 0 and "pkg://impruver.conf" in out
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "model" in out and "method" in out


def test_console_script_and_module_entry(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    exe = Path(sys.executable).with_name("impruver")
    result = subprocess.run([str(exe), "model=rugpt3lage"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 2 and "did you mean 'rugpt3large'" in result.stderr
    result = subprocess.run([sys.executable, "-m", "impruver", "plan", "--yaml"], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0 and "output_dir: outputs/demo" in result.stdout


def test_ls_describes_one_component(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "ls", "formats", "saiga")
    assert code == 0 and "formats" in out and "formats.py:" in out
    code, _, err = run_cli(capsys, "ls", "formats", "saig")
    assert code == 2 and "did you mean 'saiga'" in err


def test_version_names_impruver_and_its_dependencies_without_importing_torch(tmp_path: Path) -> None:
    code = "import sys; from impruver.cli import main; main(['--version']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    lines = result.stdout.splitlines()
    from importlib.metadata import version

    assert lines[0].startswith("impruver ") and lines[-1] == "False"
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core"):
        assert f"{name} {version(name)}" in lines


def test_info_with_and_without_a_word(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--info")
    assert code == 0 and "Defaults List" in out + err and "invalid choice" not in out + err
    code, out, err = run_cli(capsys, "chat", "--info", "defaults", "method=lora")
    assert code == 0 and "method/lora" in out + err


@pytest.mark.parametrize("line", ["impruver chat meth", "impruver meth", "impruver export method=lora meth"])
def test_completion_after_a_stage_word(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                       line: str) -> None:
    """What bash's completion function runs: `impruver -sc query=bash` with COMP_LINE set to the line typed."""
    monkeypatch.setenv("COMP_LINE", line)
    code, out, err = run_cli(capsys, "-sc", "query=bash")
    assert code == 0 and out.split() == ["method.", "method="], out + err
    monkeypatch.setenv("COMP_LINE", "impruver chat method=")
    code, out, _ = run_cli(capsys, "chat", "-sc", "query=bash")
    assert code == 0 and "method=lora" in out.split()


def test_stage_flags_are_the_stage_functions_keyword_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    from impruver import jobs

    assert cli.command_flags("chat") == {"config": True, "plan": True, "prompt": True}
    assert cli.command_flags("compose") == {"config": True, "plan": True, "force": False, "inspect": True,
                                               "export_messages": True}

    def export(plan: object, *, dest: str | None = None, shards: int = 1, verify: bool = False) -> None:
        """A stage that grew two options: the command line takes them with no table to edit."""

    monkeypatch.setattr(jobs, "stage_function", lambda stage: export)
    args = cli.split_args(["--shards", "3", "--verify", "--dest=x", "train.lr=1e-3"], "export")
    assert args.flags == {"shards": "3", "verify": True, "dest": "x"} and args.overrides == ["train.lr=1e-3"]


def test_multirun_and_cfg_together_is_a_configuration_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "-m", "train.lr=1e-3,3e-3", "--cfg", "job")
    assert code == 2 and "Traceback" not in err
