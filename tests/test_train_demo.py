"""The demo through the real `impruver` command: compose + train a tiny GPT-2 from scratch, then LoRA on its output
folder the way users fine-tune what they have; both folders load with transformers / peft alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def impruver(*args: str, env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "impruver", *args], env=env, cwd=cwd, text=True,
                            capture_output=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


def test_demo_then_lora_on_its_output(tmp_path: Path, cli_env: dict[str, str]) -> None:
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    demo = tmp_path / "demo"
    impruver(f"output_dir={demo}", "train.max_steps=30", "train.eval_steps=15", "train.save_steps=15",
             env=cli_env, cwd=tmp_path)
    losses = _losses(demo)
    assert losses[-1] < losses[0] - 1.0, losses  # the demo visibly learns even in 30 steps
    model = AutoModelForCausalLM.from_pretrained(demo)
    tok = AutoTokenizer.from_pretrained(demo)
    text = tok.apply_chat_template([{"role": "user", "content": "Привет!"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] > ids.shape[1]
    assert (demo / "plan.yaml").is_file() and "scratch" in (demo / "README.md").read_text()
    assert len(list((demo / "checkpoints").iterdir())) <= 2  # save_total_limit (+ the best one)

    lora = tmp_path / "lora"
    impruver("preset=demo", "method=lora", f"model.path={demo}", f"tokenizer.path={demo}", f"output_dir={lora}",
             "train.max_steps=4", env=cli_env, cwd=tmp_path)
    adapter = AutoPeftModelForCausalLM.from_pretrained(lora).eval()
    assert (lora / "adapter_model.safetensors").is_file() and not (lora / "model.safetensors").exists()
    with torch.no_grad():
        assert torch.isfinite(adapter(ids).logits).all()


def test_the_default_job_answers_its_heldout_questions(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The whole default job (the demo preset, its full schedule), then the check it ends with: the demo's held-out
    questions (its question kinds in new combinations and phrasings, English and Russian), greedy, exact match."""
    out = tmp_path / "demo"
    done = impruver(f"output_dir={out}", env=cli_env, cwd=tmp_path, timeout=1800)  # ~2 min idle; CI is shared
    summary = json.loads((out / "eval.json").read_text())  # written by the check the main job ends with
    assert summary["n"] >= 90 and summary["questions"] == "demo"
    assert f"({100 * summary['accuracy']:.1f}%)" in done.stdout + done.stderr  # and printed
    assert json.loads((out / "run_summary.json").read_text())["eval_accuracy"] == summary["accuracy"]
    assert summary["accuracy"] >= 0.8, {k: v for k, v in summary.items() if k != "results"}
    for lang in ("en", "ru"):  # both languages, not one carrying the other
        assert summary["by"]["lang"][lang]["accuracy"] >= 0.7, summary["by"]
