"""Honest resumes: a changed optimisation is refused unless named, then applied and recorded; a damaged checkpoint
falls back to the one before; elapsed time and the logging window continue as in an uninterrupted run.

One 15-step base run (checkpoints at steps 7 and 14, losses logged every 5 steps) is shared: each test resumes a
copy of it, so every resume takes a few steps of a tiny GPT-2.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train_support import prepare, tiny_plan, use_files  # noqa: F401  (fixture)

from impruver.errors import RunError
from impruver.jobs import train_job as run
from impruver.train.recipe import SFTRecipe

TRAIN = {"max_steps": 15, "save_steps": 7, "eval_steps": 7, "logging_steps": 5, "load_best_at_end": False}
_BASE: dict[str, Path] = {}


def _base(factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every test copies (trained once per module; needs the use_files fixture)."""
    if "run" not in _BASE:
        out = prepare(factory.mktemp("base") / "run")
        run(tiny_plan(out, train=TRAIN))
        _BASE["run"] = out
    return _BASE["run"]


def _copy(base: Path, dest: Path, *, keep: tuple[int, ...] = (7, 14)) -> Path:
    """The base run folder up to its checkpoints, without its final outputs (as a run killed at the end)."""
    shutil.copytree(base / "data", dest / "data")
    for step in keep:
        name = f"step-{step:08d}"
        shutil.copytree(base / "checkpoints" / name, dest / "checkpoints" / name)
    return dest


def _plan(out: Path, base: Path, **train: Any) -> Any:
    return tiny_plan(out, tokenizer_path=str(base / "tok"), train={**TRAIN, "resume": "auto", **train})


def _records(out: Path, event: str = "train") -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == event]


def test_a_changed_lr_is_refused_naming_each_key(tmp_path: Path, tmp_path_factory, use_files) -> None:
    base = _base(tmp_path_factory)
    out = _copy(base, tmp_path / "run")
    with pytest.raises(RunError) as info:
        run(_plan(out, base, lr=1e-5, weight_decay=0.5, logging_steps=1))
    message = str(info.value)
    assert "train.lr: 0.003 -> 1e-05" in message and "train.weight_decay: 0.0 -> 0.5" in message
    assert "train.resume_changes=[train.lr,train.weight_decay]" in message  # the override that accepts them
    assert "logging_steps" not in message  # logging changes nothing in the optimisation: applied silently
    with pytest.raises(RunError, match="train.weight_decay: 0.0 -> 0.5"):  # naming one of two is not enough
        run(_plan(out, base, lr=1e-5, weight_decay=0.5, resume_changes=["train.lr"]))
    assert not (out / "model.safetensors").exists()


def test_named_changes_apply_from_the_step_and_are_recorded(tmp_path: Path, tmp_path_factory, use_files) -> None:
    base = _base(tmp_path_factory)
    out = _copy(base, tmp_path / "run", keep=(7,))
    changed = {"lr": 1e-5, "weight_decay": 0.5, "resume_changes": ["train.lr", "train.weight_decay"]}
    plan = _plan(out, base, **changed)
    from impruver.jobs import prepare as freeze

    freeze(plan)
    recipe = SFTRecipe(plan)
    recipe.setup()
    decays = sorted(g["weight_decay"] for g in recipe.optimizer.param_groups)
    assert recipe.state.step == 7 and decays == [0.0, 0.5]  # the matrices decay at the new rate, biases never
    assert all(g["initial_lr"] == 1e-5 for g in recipe.optimizer.param_groups)
    run(plan)
    # The reference: a run planned with lr 1e-5 from the start has, from step 8 on, the same schedule.
    fresh = prepare(tmp_path / "fresh")
    run(tiny_plan(fresh, train={**TRAIN, "lr": 1e-5, "weight_decay": 0.5}))
    resumed_lr = {r["step"]: r["lr"] for r in _records(out)}
    fresh_lr = {r["step"]: r["lr"] for r in _records(fresh)}
    assert sorted(resumed_lr) == [10, 15]
    assert all(resumed_lr[s] == pytest.approx(fresh_lr[s], rel=1e-12) for s in resumed_lr), (resumed_lr, fresh_lr)
    card = (out / "README.md").read_text()
    assert "resumed at step 7 with train.lr 0.003 -> 1e-05, train.weight_decay 0.0 -> 0.5" in card
    record = json.loads((out / "run.json").read_text())
    assert record["resumes"][0]["step"] == 7
    assert record["resumes"][0]["changes"] == {"train.lr": [0.003, 1e-05], "train.weight_decay": [0.0, 0.5]}


@pytest.mark.parametrize("damage", ["truncated weights", "missing optimizer", "truncated state"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(damage: str, tmp_path: Path, tmp_path_factory,
                                                                   use_files, caplog) -> None:
    from safetensors.torch import load_file

    base = _base(tmp_path_factory)
    out = _copy(base, tmp_path / "run")
    latest = out / "checkpoints" / "step-00000014"
    name = {"truncated weights": "trainable.safetensors", "missing optimizer": "optimizer.pt",
            "truncated state": "state.json"}[damage]
    if damage == "missing optimizer":
        (latest / name).unlink()
    else:
        data = (latest / name).read_bytes()
        (latest / name).write_bytes(data[: len(data) // 2])
    logging.getLogger("impruver").addHandler(caplog.handler)
    try:
        summary = run(_plan(out, base))
    finally:
        logging.getLogger("impruver").removeHandler(caplog.handler)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(latest / name) in w for w in warned), warned
    assert summary["resumes"][0]["step"] == 7
    a, b = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    for key in a:  # resumed from step 7: the same weights as the uninterrupted run
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_no_good_checkpoint_says_what_to_do(tmp_path: Path, tmp_path_factory, use_files) -> None:
    base = _base(tmp_path_factory)
    out = _copy(base, tmp_path / "run")
    for folder in (out / "checkpoints").iterdir():
        (folder / "optimizer.pt").unlink()
    with pytest.raises(RunError, match=r"no checkpoint in .* can be used(.|\n)*optimizer.pt is missing"
                                       r"(.|\n)*train.resume=never"):
        run(_plan(out, base))


class _StopsAtStep(SFTRecipe):
    """Slow steps (so the time before the kill is known), then Ctrl+C during optimizer step ``stop_at``."""

    stop_at = 10

    def step_loss(self, batch):
        if self.state.step + 1 == self.stop_at:
            raise KeyboardInterrupt
        time.sleep(0.05)
        return super().step_loss(batch)


def test_elapsed_time_and_the_logging_window_carry_over(tmp_path: Path, tmp_path_factory, use_files) -> None:
    from impruver.jobs import prepare as freeze

    base = _base(tmp_path_factory)
    out = _copy(base, tmp_path / "run", keep=())
    plan = _plan(out, base, resume="never")
    freeze(plan)
    recipe = _StopsAtStep(plan)
    recipe.setup()
    with pytest.raises(KeyboardInterrupt):
        recipe.train()
    saved = json.loads((out / "checkpoints" / "step-00000007" / "state.json").read_text())
    assert saved["elapsed_s"] >= 7 * 0.05  # seven slow steps before the checkpoint
    summary = run(_plan(out, base))
    after = _records(out)
    resumed = [r for r in after if r["step"] > 7]
    assert resumed[0]["elapsed_s"] > saved["elapsed_s"] and summary["elapsed_s"] > saved["elapsed_s"]
    # Step 10's loss covers steps 6-10 (two of them before the checkpoint), as in the uninterrupted run.
    reference = {r["step"]: r["loss"] for r in _records(base)}
    assert resumed[0]["step"] == 10
    assert resumed[0]["loss"] == pytest.approx(reference[10], rel=1e-6)
