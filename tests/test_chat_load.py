"""Loading what a run left in output_dir: full, adapter and merged outputs; clear errors for anything less."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_chat_support import REPO, chat_dirs, chat_plan, cli_env, direct_reply, impruver_cmd  # noqa: F401, F811

from impruver.chat.load import load, locate
from impruver.errors import RunError

HELLO = [{"role": "user", "content": "Привет"}]


def test_full_output_loads_and_replies_like_generate(chat_dirs: dict[str, Path]) -> None:
    from impruver.chat.generate import Generation, generation_kwargs, render

    plan = chat_plan(chat_dirs["full"])
    loaded = load(plan)
    assert loaded.found.kind == "full" and loaded.context_length == 2048
    reply = Generation(loaded.model, loaded.tokenizer, render(loaded.tokenizer, HELLO), generation_kwargs(plan.chat))
    assert reply.wait() == direct_reply(loaded.model, loaded.tokenizer, HELLO)
    assert reply.finish_reason == "length" and reply.completion_tokens == 24


def test_adapter_loads_on_its_base_and_merged_export_matches_it(chat_dirs: dict[str, Path]) -> None:
    import torch
    from peft import PeftModel

    adapter = load(chat_plan(chat_dirs["adapter"]))
    assert adapter.found.kind == "adapter" and isinstance(adapter.model, PeftModel)
    assert adapter.found.base == str(chat_dirs["full"])
    merged = load(chat_plan(chat_dirs["merged_run"]))
    assert merged.found.kind == "merged" and merged.found.folder == chat_dirs["merged_run"] / "merged"
    full = load(chat_plan(chat_dirs["full"]))
    ids = torch.tensor([adapter.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True)["input_ids"]])
    with torch.no_grad():
        logits = {name: m.model(ids).logits for name, m in
                  (("adapter", adapter), ("merged", merged), ("full", full))}
    torch.testing.assert_close(logits["merged"], logits["adapter"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits["adapter"], logits["full"], atol=1e-3)  # the adapter does change the model


def test_adapter_base_falls_back_to_the_runs_plan(chat_dirs: dict[str, Path], tmp_path: Path) -> None:
    moved = tmp_path / "adapter"
    shutil.copytree(chat_dirs["adapter"], moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")  # the base moved since training
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="base model cannot be found.*model.path"):
        locate(moved)
    assert locate(moved, model_path=str(chat_dirs["full"])).base == str(chat_dirs["full"])
    plan_file = moved / "plan.yaml"
    plan_file.write_text(plan_file.read_text().replace("path: null", f"path: {chat_dirs['full']}", 1))
    assert locate(moved).base == str(chat_dirs["full"])


def test_a_merged_export_older_than_its_adapter_is_not_used(chat_dirs: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(chat_dirs["adapter"], run)
    shutil.copytree(chat_dirs["merged_run"] / "merged", run / "merged")
    assert locate(run).kind == "merged"
    os.utime(run / "merged" / "model.safetensors", (1_000_000, 1_000_000))  # exported before the adapter changed
    assert locate(run).kind == "adapter"
    assert "merged is older than adapter_model.safetensors: chatting with the adapter" in capsys.readouterr().err


def test_missing_output_dir_names_it_and_the_command(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=rf"{tmp_path / 'nope'} does not exist.*impruver train"):
        locate(tmp_path / "nope")


@pytest.mark.parametrize("case", ["empty", "plan_only", "running", "checkpoints", "hf_checkpoints", "truncated", "no_weights", "bin_only",
                                  "missing_shard", "adapter_without_weights"])
def test_half_written_output_dir_says_what_is_missing(case: str, chat_dirs: dict[str, Path],
                                                      tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    full = chat_dirs["full"]
    expected = {
        "empty": "no model weights.*impruver train",
        "plan_only": "holds a plan.*no trained model yet.*impruver train",
        "running": r"training run seems to be in progress \(metrics.jsonl was written \d+ s ago\)",
        "checkpoints": r"checkpoints \(step-00000010, step-00000020\): the training run stopped before the end. "
                       r"Finish it with `impruver train output_dir=\S+ train.resume=auto`\.$",
        "hf_checkpoints": r"checkpoint-10, checkpoint-20\).*train.resume=auto`, or chat with a checkpoint: "
                          r"`impruver chat output_dir=\S+checkpoint-20`",
        "truncated": "model.safetensors is truncated.*still being written",
        "no_weights": "no model weights",
        "bin_only": "pytorch_model.bin.*safetensors",
        "missing_shard": "missing weight shards model-00002-of-00002.safetensors",
        "adapter_without_weights": "adapter_config.json but no adapter_model.safetensors",
    }[case]
    if case in ("plan_only", "running"):
        shutil.copy(full / "plan.yaml", out)
    if case == "running":
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 7.7}\n')
    if case == "checkpoints":  # impruver's own: trainable weights and state, not standalone models
        for step in (10, 20):
            (out / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
            (out / "checkpoints" / f"step-{step:08d}" / "state.json").write_text("{}")
    if case == "hf_checkpoints":
        for step in (10, 20):
            shutil.copytree(full, out / f"checkpoint-{step}")
    if case in ("truncated", "no_weights", "bin_only", "missing_shard"):
        shutil.copy(full / "config.json", out)
    if case == "truncated":
        data = (full / "model.safetensors").read_bytes()
        (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    if case == "bin_only":
        (out / "pytorch_model.bin").write_bytes(b"pickle")
    if case == "missing_shard":
        shutil.copy(full / "model.safetensors", out / "model-00001-of-00002.safetensors")
        weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
        (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if case == "adapter_without_weights":
        shutil.copy(chat_dirs["adapter"] / "adapter_config.json", out)
    with pytest.raises(RunError, match=expected) as error:
        locate(out)
    assert str(out) in str(error.value)


def test_replies_that_would_fill_the_context_are_capped(capsys: pytest.CaptureFixture[str]) -> None:
    from impruver.chat.load import chat_settings
    from impruver.plan import ChatSpec

    assert chat_settings(ChatSpec(max_new_tokens=255), 256).max_new_tokens == 255
    assert capsys.readouterr().err == ""
    assert chat_settings(ChatSpec(max_new_tokens=256), 256).max_new_tokens == 128  # the demo's defaults
    assert "replies are capped at 128 tokens" in capsys.readouterr().err


def test_missing_tokenizer_is_reported(chat_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(chat_dirs["full"] / name, out)
    with pytest.raises(RunError, match=rf"{out} has no tokenizer.*impruver train"):
        load(chat_plan(out))


def test_command_on_a_missing_model_exits_2_with_a_message_and_no_traceback(tmp_path: Path) -> None:
    for stage in ("chat", "serve"):
        done = subprocess.run(impruver_cmd(stage, f"output_dir={tmp_path}", "--prompt", "hi")
                              if stage == "chat" else impruver_cmd(stage, f"output_dir={tmp_path}"),
                              cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert f"{tmp_path} has no model to chat with" in done.stderr
        assert "impruver train" in done.stderr and "Traceback" not in done.stderr + done.stdout


@pytest.mark.parametrize(("stage", "flag", "message"), [
    ("serve", "--prompt=hi", "--prompt: impruver serve takes no such flag; valid: --api-key, --config"),
    ("chat", "--force", "--force: impruver chat takes no such flag; valid: --config, --plan, --prompt"),
])
def test_flags_of_other_stages_are_refused_clearly(chat_dirs: dict[str, Path], stage: str, flag: str,
                                                   message: str) -> None:
    done = subprocess.run(impruver_cmd(stage, f"output_dir={chat_dirs['full']}", flag), cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
