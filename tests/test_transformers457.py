"""The demo's output loads with transformers 4.57 (what llama.cpp's converter and many serving stacks pin) and gives
the same tokens, chat text, logits and greedy continuation as with the transformers installed here.

transformers 4.57 with its tokenizers and huggingface_hub goes into a folder of its own (``pip install --target``,
no dependencies beyond the HTTP client; torch, numpy and safetensors come from this environment), cached under
``~/.cache/impruver-tests`` so that a machine pays for it once (~30 s). Each version runs the same probe script in
a subprocess on the same folder. Where the install fails: the test fails in CI (``CI`` set), and skips elsewhere
(a laptop without network).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

PINNED = ["transformers==4.57.*", "tokenizers>=0.22,<0.23", "huggingface_hub>=0.34,<1.0",
          # huggingface_hub 0.x speaks HTTP through requests (this environment's huggingface_hub does not)
          "requests", "urllib3", "idna", "certifi", "charset-normalizer"]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "impruver-tests" / "transformers-4.57"
TEXTS = ["Hello, how are you?", "Привет! Сколько будет 2 + 3?", "  spaces\tand\nnewlines  "]
CHAT = [{"role": "user", "content": "What is 7 + 5?"}, {"role": "assistant", "content": "12"},
        {"role": "user", "content": "А 2 + 3?"}]

PROBE = r"""
import json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = sys.argv[1]
chat = json.loads(sys.argv[2])
texts = json.loads(sys.argv[3])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
ids = tok(prompt, add_special_tokens=False)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0, -4:].tolist()
    greedy = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
print(json.dumps({"version": transformers.__version__, "ids": [tok(t)["input_ids"] for t in texts],
                  "decoded": [tok.decode(tok(t)["input_ids"]) for t in texts], "prompt": prompt,
                  "logits": logits, "greedy": greedy, "eos": model.generation_config.eos_token_id}))
"""


def pinned_transformers() -> Path:
    """The folder holding transformers 4.57 (installed on first use)."""
    if (CACHE / "transformers" / "__init__.py").is_file():
        return CACHE
    tmp = CACHE.with_name(CACHE.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp),
                           *PINNED], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        message = f"cannot install {' '.join(PINNED[:3])}: {done.stderr.strip()[-1500:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message + " (no network here; CI installs it)")
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(CACHE)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return CACHE


def probe(folder: Path, pythonpath: Path | None) -> dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run([sys.executable, "-c", PROBE, str(folder), json.dumps(CHAT), json.dumps(TEXTS)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo preset's output (its own trained BPE tokenizer and saiga template), after a few steps."""
    from impruver.compose import compose
    from impruver.jobs import train_job
    from impruver.plan import make_plan

    out = tmp_path_factory.mktemp("t457") / "demo"
    composed = compose(["preset=demo", f"output_dir={out}", "train.max_steps=3", "train.eval_steps=3",
                        "train.save_steps=3", "dataset.num_proc=1", "~eval.questions"])
    train_job(make_plan(composed.config, choices=composed.choices))
    return out


def test_the_demo_output_loads_alike_in_transformers_4_57_and_now(demo_output: Path) -> None:
    old = probe(demo_output, pinned_transformers())
    new = probe(demo_output, None)
    assert old["version"].startswith("4.57.") and not new["version"].startswith("4.57."), (old["version"],
                                                                                           new["version"])
    assert old["ids"] == new["ids"] and old["decoded"] == new["decoded"]
    assert old["prompt"] == new["prompt"] and "bot\n" in new["prompt"]  # the saiga template, rendered alike
    assert old["greedy"] == new["greedy"]
    assert old["eos"] == new["eos"]
    for a, b in zip(old["logits"], new["logits"]):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
