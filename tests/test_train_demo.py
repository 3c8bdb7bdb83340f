"""The demo through the real `impruver` command: compose + train a tiny GPT-2 from scratch, then LoRA on its output
folder the way users fine-tune what they have; both folders load with transformers / peft alone."""

from __future__ import annotations

import json
import os
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


@pytest.fixture(scope="module")
def module_env() -> dict[str, str]:
    """The cli_env fixture's environment, for the module-scoped runs below."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def default_job(tmp_path_factory: pytest.TempPathFactory, module_env: dict[str, str]) -> tuple[Path, str]:
    """The whole default job (the demo preset, its full schedule, then its check), run once for this module: the
    output folder and what the run printed. The preference tests below start from it, as users do."""
    root = tmp_path_factory.mktemp("default_job")
    out = root / "demo"
    done = impruver(f"output_dir={out}", env=module_env, cwd=root, timeout=1800)  # ~2.5 min idle; CI is shared
    return out, done.stdout + done.stderr


@pytest.fixture(scope="module")
def demo_dpo(default_job: tuple[Path, str], module_env: dict[str, str]) -> tuple[Path, str]:
    """`impruver preset=demo objective=dpo` on the default job's output, as shipped: its output and what it
    printed."""
    sft, _ = default_job
    out = sft.with_name("demo-dpo")
    done = impruver("preset=demo", "objective=dpo", f"model.path={sft}", f"output_dir={out}", env=module_env,
                    cwd=out.parent, timeout=1200)
    return out, done.stdout + done.stderr


@pytest.fixture(scope="module")
def demo_lora_dpo(default_job: tuple[Path, str], module_env: dict[str, str]) -> tuple[Path, str]:
    """LoRA DPO on the same output for a few steps (the reference: the model with its adapter disabled); a high
    learning rate so that the adapter moves the weights visibly; no check at the end. `method.builder=lora`, not
    `method=lora`: the demo's DPO preset sets `method.builder: full` after the method group is merged (Hydra refuses
    a group override in a config chosen by interpolation), and would turn the chosen lora group back into full."""
    sft, _ = default_job
    out = sft.with_name("demo-lora-dpo")
    done = impruver("preset=demo", "objective=dpo", "method.builder=lora", "objective.reference=model",
                    f"model.path={sft}",
                    f"output_dir={out}", "train.max_steps=3", "train.lr=1e-2", "eval.questions=null",
                    env=module_env, cwd=out.parent, timeout=600)
    return out, done.stdout + done.stderr


def test_the_default_job_answers_its_heldout_questions(default_job: tuple[Path, str]) -> None:
    """The whole default job (the demo preset, its full schedule), then the check it ends with: the demo's held-out
    questions (its question kinds in new combinations and phrasings, English and Russian), greedy, exact match."""
    out, printed = default_job
    summary = json.loads((out / "eval.json").read_text())  # written by the check the main job ends with
    assert summary["n"] >= 90 and summary["questions"] == "demo"
    assert f"({100 * summary['accuracy']:.1f}%)" in printed  # and printed
    assert json.loads((out / "run_summary.json").read_text())["eval_accuracy"] == summary["accuracy"]
    assert summary["accuracy"] >= 0.8, {k: v for k, v in summary.items() if k != "results"}
    for lang in ("en", "ru"):  # both languages, not one carrying the other
        assert summary["by"]["lang"][lang]["accuracy"] >= 0.7, summary["by"]


def test_dpo_on_the_demo_model_raises_heldout_preference_accuracy_and_margin(
        demo_dpo: tuple[Path, str], default_job: tuple[Path, str]) -> None:
    """The shipped demo DPO preset, on the demo model: the held-out pairs' preference accuracy and mean reward
    margin end above where they started, in the run summary and printed; the demo's own check barely moves."""
    from impruver.layout import RunLayout

    out, printed = demo_dpo
    layout = RunLayout.of(out)
    summary = json.loads(layout.run_summary.read_text(encoding="utf-8"))
    assert summary["objective"] == "dpo"
    start = summary["heldout_accuracy_start"], summary["heldout_margin_start"]
    end = summary["heldout_accuracy_end"], summary["heldout_margin_end"]
    assert end[0] > start[0] and end[1] > start[1], summary
    # At the start the policy is its own reference: every reward is 0, so accuracy (margin > 0) starts at 0. The end
    # must be a clear majority of the held-out pairs (0.69 to 0.81 measured over three seeds), not noise above a tie.
    assert end[0] >= 0.6, summary
    # printed as PreferenceRecipe prints them: "held-out preference accuracy A, margin M, loss L -> accuracy ..."
    for accuracy, margin in (start, end):
        assert f"accuracy {accuracy:.3f}, margin {margin:.4f}" in printed, printed[-3000:]
    # DPO sharpens what SFT taught; it must not cost the demo's exact-match check more than a few questions
    before = json.loads(RunLayout.of(default_job[0]).eval_report.read_text(encoding="utf-8"))
    after = json.loads(layout.eval_report.read_text(encoding="utf-8"))
    assert after["n"] == before["n"] and after["accuracy"] >= before["accuracy"] - 0.05, (before["accuracy"],
                                                                                          after["accuracy"])


QUESTION = [{"role": "user", "content": "What is 7 + 5?"}]


@pytest.mark.parametrize("run", ["demo_dpo", "demo_lora_dpo"])
def test_chat_serve_and_gguf_export_work_on_preference_outputs(run: str, request: pytest.FixtureRequest,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """What a preference run leaves (a full model; a LoRA adapter on the SFT model) is used as any run's output:
    `impruver chat` answers as transformers' greedy generate does, `impruver serve` answers the official openai
    client the same, and `impruver export --gguf f16` (the adapter merged first) writes a file llama.cpp loads
    and continues greedily as transformers does."""
    import llama_cpp
    import torch
    from test_chat_server import client, serving
    from test_chat_support import chat_plan, direct_reply
    from test_gguf import STEPS, _greedy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from impruver.chat.load import load
    from impruver.jobs import run_stage
    from impruver.layout import RunLayout

    out, _ = request.getfixturevalue(run)
    layout = RunLayout.of(out)
    adapter = (out / "adapter_config.json").is_file()
    assert adapter == (run == "demo_lora_dpo")
    # `impruver chat output_dir=... chat.do_sample=false --prompt ...`, in this process (the command line's own path
    # is test_chat_demo's): one process start less per output
    plan = chat_plan(out, "chat.max_new_tokens=16")
    capsys.readouterr()
    run_stage("chat", plan, prompt=QUESTION[0]["content"])
    printed = capsys.readouterr().out
    loaded = load(plan)
    expected = direct_reply(loaded.model, loaded.tokenizer, QUESTION, max_new_tokens=16)
    assert printed == f"{expected}\n"
    if not adapter:
        assert expected == "7 + 5 = 12."  # the DPO'd demo still answers what its SFT run taught
    with serving(loaded, plan.chat) as url:
        answer = client(url).chat.completions.create(model=loaded.name, messages=QUESTION, temperature=0,
                                                     max_tokens=16)
    assert answer.choices[0].message.content == expected

    run_stage("export", plan, gguf="f16")  # `impruver export --gguf f16` in this process (its flags: test_gguf_runs)
    standalone = layout.merged if adapter else out  # an adapter is merged into its base first
    gguf = layout.gguf / f"{out.name}-f16.gguf"
    model, tok = AutoModelForCausalLM.from_pretrained(standalone).eval(), AutoTokenizer.from_pretrained(standalone)
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(gguf), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                              pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    assert _greedy(llm, ids) == want
    if adapter:  # the adapter moved the weights: the merged model is not its SFT base
        sft = AutoModelForCausalLM.from_pretrained(request.getfixturevalue("default_job")[0]).eval()
        with torch.no_grad():
            assert not torch.allclose(model(torch.tensor([ids])).logits, sft(torch.tensor([ids])).logits, atol=1e-3)
