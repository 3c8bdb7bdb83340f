"""The demo end to end: train it through the `impruver` command (a few steps), then chat with what it saved."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_chat_support import REPO, cli_env, direct_reply, impruver_cmd


@pytest.mark.integration
def test_chat_with_the_trained_demo(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "demo"
    train = subprocess.run(impruver_cmd(f"output_dir={out}", "train.max_steps=3", "train.eval_steps=3"), cwd=REPO,
                           env=cli_env(), capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    chat = ("chat", f"output_dir={out}", "chat.do_sample=false", "chat.max_new_tokens=16")
    one = subprocess.run(impruver_cmd(*chat, "--prompt", "Привет!"), cwd=REPO, env=cli_env(), capture_output=True,
                         text=True, timeout=300)
    piped = subprocess.run(impruver_cmd(*chat), input="Привет!\nКак дела?\n", cwd=REPO, env=cli_env(),
                           capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and piped.returncode == 0, one.stderr + piped.stderr
    model, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    first = direct_reply(model, tok, [{"role": "user", "content": "Привет!"}], max_new_tokens=16)
    second = direct_reply(model, tok, [{"role": "user", "content": "Привет!"}, {"role": "assistant", "content": first},
                                       {"role": "user", "content": "Как дела?"}], max_new_tokens=16)
    assert one.stdout == f"{first}\n"
    assert piped.stdout == f"{first}\n{second}\n"
