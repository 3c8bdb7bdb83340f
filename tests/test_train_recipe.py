"""The training recipe end to end on tiny models (CPU): losses fall, outputs load, resume is exact."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from test_train_support import LLAMA_ARCH, prepare, tiny_plan, use_files  # noqa: F401  (fixture)

from impruver.jobs import train_job as run  # compose if needed (here: the test's files), freeze the plan, train
from impruver.train.recipe import SFTRecipe


def _train_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


def test_scratch_gpt2_loss_falls_and_output_loads(tmp_path: Path, use_files) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = prepare(tmp_path / "run")
    summary = run(tiny_plan(out, train={"max_steps": 30, "lr": 1e-2}))
    losses = _train_losses(out)
    assert summary["steps"] == 30 and summary["world_size"] == 1
    assert losses[-1] < 0.7 * losses[0], losses
    for name in ("model.safetensors", "config.json", "plan.yaml", "metrics.jsonl", "README.md", "run.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")), "weights are safetensors only"
    if importlib.util.find_spec("matplotlib"):
        assert (out / "loss.png").stat().st_size > 1000
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and model.get_input_embeddings().weight.shape[0] == len(tok)
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["world_size"] == 1
    assert "trained from scratch" in (out / "README.md").read_text()


def test_full_llama_loss_falls_with_accumulation_and_checkpointing(tmp_path: Path, use_files) -> None:
    out = prepare(tmp_path / "run")
    run(tiny_plan(out, arch=LLAMA_ARCH, train={"max_steps": 40, "lr": 1e-2, "grad_accum": 2, "batch_size": 2,
                                                "gradient_checkpointing": True, "packing": False}))
    losses = _train_losses(out)
    assert losses[-1] < 0.8 * losses[0], losses


class _StopsAtStep(SFTRecipe):
    """The recipe with one seam replaced: Ctrl+C during the micro-batch of optimizer step ``stop_at``."""

    stop_at = 13

    def step_loss(self, batch):
        if self.state.step + 1 == self.stop_at:
            raise KeyboardInterrupt
        return super().step_loss(batch)


def test_resume_after_a_kill_ends_with_the_same_weights(tmp_path: Path, use_files) -> None:
    """A run stopped after its step-10 checkpoint and resumed with resume=auto equals an uninterrupted run."""
    from safetensors.torch import load_file

    from impruver.jobs import prepare as freeze

    train = {"max_steps": 20, "save_steps": 10, "eval_steps": 10, "load_best_at_end": False}
    full = prepare(tmp_path / "full")
    run(tiny_plan(full, train=train))
    part = prepare(tmp_path / "part")
    plan = tiny_plan(part, train=train)
    freeze(plan)
    recipe = _StopsAtStep(plan)
    recipe.setup()
    with pytest.raises(KeyboardInterrupt):
        recipe.train()
    assert recipe.state.step == 12 and (part / "checkpoints" / "step-00000010").is_dir()
    run(tiny_plan(part, train={**train, "resume": "auto"}))
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)  # bitwise: the same steps on the same state
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == sorted(set(steps)), "no step is logged twice after the resume"


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path: Path, use_files, monkeypatch) -> None:
    import impruver.train.outputs as outputs

    seen = {}
    real_save = outputs.save_model

    def capture(model, tokenizer, plan, *, adapter, state_dict=None):
        seen["dtypes"] = {p.dtype for p in model.parameters()}
        return real_save(model, tokenizer, plan, adapter=adapter, state_dict=state_dict)

    monkeypatch.setattr(outputs, "save_model", capture)
    out = prepare(tmp_path / "run")
    plan = tiny_plan(out, method="full", model={"builder": "arch", "arch": {**LLAMA_ARCH}, "dtype": "bfloat16"},
                     train={"max_steps": 20, "lr": 1e-2})
    plan = plan.model_copy(update={"hardware": plan.hardware.model_copy(update={"mixed_precision": "bf16"})})
    run(plan)
    assert seen["dtypes"] == {torch.float32}  # model.dtype bfloat16 is the compute dtype, not the master copy
    losses = _train_losses(out)
    assert losses[-1] < losses[0], losses


def test_checkpoints_rotate_and_the_best_one_is_kept_and_reported(tmp_path: Path, use_files) -> None:
    from safetensors.torch import load_file

    out = prepare(tmp_path / "run", n_train=16)
    summary = run(tiny_plan(out, train={"max_steps": 30, "lr": 3e-2, "save_steps": 5, "eval_steps": 5,
                                         "save_total_limit": 1}))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if r["event"] == "eval"}
    assert sorted(evals) == [5, 10, 15, 20, 25, 30]
    best = min(evals, key=evals.get)
    assert summary["best_step"] == best and summary["eval_loss"] == pytest.approx(evals[best], abs=1e-6)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    expected = {"step-00000025"} | ({f"step-{best:08d}"} if best < 30 else set())
    assert set(kept) == expected
    if best < 30:  # the saved model is the best checkpoint's, not the last step's
        saved = load_file(out / "model.safetensors")
        best_weights = load_file(out / "checkpoints" / f"step-{best:08d}" / "trainable.safetensors")
        for name, value in best_weights.items():
            key = name if name in saved else name.replace("lm_head.", "transformer.wte.")
            if key in saved:
                assert torch.equal(saved[key], value), name


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("IMPRUVER_TEST_COMPILE"),
                    reason="inductor compiles for ~1 min on 2 cores; set IMPRUVER_TEST_COMPILE=1 to run it")
def test_compiled_training_matches_eager(tmp_path: Path, use_files) -> None:
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on the CPU needs a C compiler")
    eager, compiled = prepare(tmp_path / "eager"), prepare(tmp_path / "compiled")
    run(tiny_plan(eager, train={"max_steps": 4, "eval_steps": None, "save_steps": None}))
    run(tiny_plan(compiled, train={"max_steps": 4, "eval_steps": None, "save_steps": None, "compile": True}))
    a, b = _train_losses(eager), _train_losses(compiled)
    assert a == pytest.approx(b, rel=1e-3)


def test_resume_refuses_settings_that_change_the_data_order(tmp_path: Path, use_files) -> None:
    from impruver.errors import RunError

    out = prepare(tmp_path / "run")
    run(tiny_plan(out, train={"max_steps": 10, "save_steps": 5}))
    with pytest.raises(RunError, match="train.batch_size: 4 -> 2"):
        run(tiny_plan(out, train={"max_steps": 10, "save_steps": 5, "batch_size": 2, "resume": "auto"}))
