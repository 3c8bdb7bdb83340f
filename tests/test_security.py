"""Config files and overrides cannot run code: instantiation keys and Hydra callbacks are refused before
anything runs (exit 2, the key named, nothing written), for every command that reads a config."""

from __future__ import annotations

from pathlib import Path

import pytest

from impruver import cli
from impruver.compose import check_safe


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out + err


def callback_file(folder: Path, victim: Path) -> Path:
    """The attack of the issue: a Hydra callback that calls pathlib.Path.write_text at the end of the run."""
    config = folder / "evil.yaml"
    config.write_text(
        "seed: 1\n"
        "hydra:\n"
        "  callbacks:\n"
        "    x:\n"
        "      _target_: pathlib.Path.write_text\n"
        f"      self: {victim}\n"
        "      data: import os\n"
    )
    return config


@pytest.mark.parametrize("command", [[], ["plan"], ["run", "finetune"], ["chat"], ["--cfg", "job"]])
def test_a_config_file_with_a_callback_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "site-packages" / "evil.pth"
    config = callback_file(tmp_path, victim)
    code, text = run_cli(capsys, *command, "--config", str(config))
    assert code == 2
    assert "hydra.callbacks.x._target_" in text and "Traceback" not in text
    assert not victim.exists() and not victim.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.yaml"], "nothing written: no outputs/, no data"


@pytest.mark.parametrize(("override", "key"), [
    ("hydra.callbacks.x._target_=pathlib.Path.write_text", "hydra.callbacks.x._target_"),
    ("+hydra.callbacks.x={_target_: pathlib.Path.write_text, self: /tmp/x, data: y}", "hydra.callbacks.x._target_"),
    ("+hydra.callbacks.x={}", "hydra.callbacks"),
    ("model.options={_target_: os.system, _args_: [id]}", "model.options._target_"),
    ("hydra.launcher._target_=os.system", "hydra.launcher._target_"),
    ("hydra.searchpath=[file:///tmp]", "hydra.searchpath"),
    ("+hydra.job.env_set.PYTHONPATH=/tmp/evil", "hydra.job.env_set.PYTHONPATH"),
])
def test_an_override_that_names_code_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, override: str, key: str) -> None:
    monkeypatch.chdir(tmp_path)
    for command in ([], ["plan"]):
        code, text = run_cli(capsys, *command, override)
        assert code == 2 and key in text, text
    assert list(tmp_path.iterdir()) == []


def test_instantiation_keys_anywhere_in_a_file_are_named(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  arch:\n    _target_: os.system\n"
                      "dataset:\n  sources:\n    - {path: a.jsonl, _partial_: true}\n")
    keys = sorted(p.key for p in check_safe([], str(config)))
    assert keys == ["dataset.sources[0]._partial_", "model.arch._target_"]


def test_a_config_folder_with_hydra_groups_is_refused(tmp_path: Path) -> None:
    """A user's folder is searched for config groups: hydra/launcher/x.yaml there could name any class."""
    (tmp_path / "hydra" / "launcher").mkdir(parents=True)
    (tmp_path / "hydra" / "launcher" / "x.yaml").write_text("_target_: os.system\n")
    config = tmp_path / "c.yaml"
    config.write_text("seed: 1\n")
    (problem,) = check_safe(["hydra/launcher=x"], str(config))
    assert problem.key == "--config" and "hydra" in problem.message


def test_launchers_and_sweepers_by_group_name_are_fine(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("defaults:\n  - override hydra/launcher: joblib\nseed: 1\n")
    assert check_safe(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra/sweeper=optuna",
                       "+hydra.job.env_set.CUDA_VISIBLE_DEVICES=0",
                       "train.lr=1e-3,3e-3", "dataset.sources={a: {path: x.jsonl, format: openai}}"],
                      str(config)) == []
