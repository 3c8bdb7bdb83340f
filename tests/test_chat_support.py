"""Tiny trained-looking output folders for the chat tests, built in code (no downloads), plus helpers.

Each fixture writes what a training run leaves in its output_dir: a GPT-2 with random weights saved as
safetensors, a byte-level BPE tokenizer trained here on a few sentences, a saiga-style chat template
(``<s>{role}\\n{content}</s>``), and plan.yaml; the adapter case a LoRA adapter on such a base, and the merged
case the adapter merged into a standalone model under ``merged/``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = (  # roles: system, user, assistant (written bot), function_call, function_response
    "{#- renders every role as it is, function_call and function_response included #}"
    "{% for m in messages %}"
    "{{ '<s>' + ('bot' if m['role'] == 'assistant' else m['role']) + '\\n' + m['content'] + '</s>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>bot\\n' }}{% endif %}"
)
CORPUS = [
    "Привет! Как дела? Hello, how are you today?",
    "Сайга — русскоязычный автоматический ассистент. It talks with people and helps them.",
    "The quick brown fox jumps over the lazy dog. Съешь же ещё этих мягких французских булок.",
    '{"name": "get_weather", "arguments": {"city": "Moscow"}} function_call function_response',
]
CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Moscow"}})  # what the function caller says
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
POSITIONS = 2048  # long enough for a reply that is still streaming when the Ctrl+C test interrupts it


def build_tokenizer() -> Any:
    """A byte-level BPE (~400 tokens) with <s>, </s>, <pad>, <unk> and the saiga-style template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = TEMPLATE
    return fast


def build_model(tokenizer: Any, seed: int = 0, *, positions: int = POSITIONS, init: float = 0.5) -> Any:
    """A 2-layer GPT-2 (32 wide) with random weights; its end-of-turn logit is pinned to 0 so that greedy
    replies run to max_new_tokens instead of ending at a random </s> (what a reply says is random anyway)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=positions, n_embd=32, n_layer=2, n_head=2,
                        initializer_range=init,  # larger than GPT-2's 0.02, so greedy replies do not repeat one token
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight[tokenizer.eos_token_id].zero_()  # tied with lm_head: eos logit = 0
    return model


def make_plan(*overrides: str) -> Any:
    """A validated Plan, as the command line makes it (compose, then make_plan)."""
    from impruver.compose import compose
    from impruver.plan import make_plan as _make_plan

    composed = compose(["preset=demo", *overrides])
    return _make_plan(composed.config, choices=composed.choices)


def write_plan(folder: Path, *overrides: str) -> None:
    """plan.yaml as the training job writes it."""
    make_plan(f"output_dir={folder}", *overrides).write(folder)


def save_full(folder: Path, seed: int = 0) -> Path:
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_plan(folder)
    return folder


def save_adapter(base: Path, folder: Path) -> Path:
    """A LoRA adapter (non-zero, so it changes the replies) on ``base``, saved the way peft saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    write_plan(folder)
    return folder


def save_merged(adapter: Path, folder: Path) -> Path:
    """The adapter merged into its base: a standalone model, as `impruver export` writes it."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(adapter).merge_and_unload()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(folder)
    return folder


# Built once per test session: each test module that imports a fixture gets its own copy of the fixture, and
# the copies share what was built through this cache.
_BUILT: dict[str, Any] = {}


@pytest.fixture(scope="session")
def chat_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{full, adapter, merged_run}: a full model run, an adapter run, and an adapter run with merged/ export."""
    if "chat_dirs" not in _BUILT:
        _BUILT["chat_dirs"] = _chat_dirs(tmp_path_factory)
    return _BUILT["chat_dirs"]


def _chat_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    full = save_full(root / "full")
    adapter = save_adapter(full, root / "adapter")
    merged_run = root / "merged_run"
    merged_run.mkdir()
    save_merged(adapter, merged_run / "merged")
    write_plan(merged_run)
    return {"full": full, "adapter": adapter, "merged_run": merged_run}


@pytest.fixture(scope="session")
def function_caller(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model overfit to answer 'Погода?' with a function call (CALL) and the function's result with text,
    with and without function schemas (TOOLS) in the request. Prompts are rendered by impruver's chat (as the
    training data would be: schemas in the system turn for a template that never reads `tools`)."""
    if "function_caller" not in _BUILT:
        _BUILT["function_caller"] = _function_caller(tmp_path_factory)
    return _BUILT["function_caller"]


def _function_caller(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from impruver.chat.generate import render

    tok = build_tokenizer()
    model = build_model(tok, seed=2, positions=256, init=0.02).train()
    user = {"role": "user", "content": "Погода?"}
    exchanges = [
        ([user], CALL),
        ([user, {"role": "function_call", "content": CALL}, {"role": "function_response", "content": '{"temp": 21}'}],
         "Тепло, +21"),
    ]
    rows = []  # (prompt ids, answer ids) with and without tools
    for tools in (None, TOOLS):
        for turns, answer in exchanges:
            rows.append((render(tok, turns, tools=tools), tok(answer + "</s>", add_special_tokens=False)["input_ids"]))
    width = max(len(p) + len(a) for p, a in rows)  # one right-padded batch; loss on the answers only
    pad = [width - len(p) - len(a) for p, a in rows]
    ids = torch.tensor([p + a + [tok.pad_token_id] * n for (p, a), n in zip(rows, pad)])
    labels = torch.tensor([[-100] * len(p) + a + [-100] * n for (p, a), n in zip(rows, pad)])
    mask = torch.tensor([[1] * (len(p) + len(a)) + [0] * n for (p, a), n in zip(rows, pad)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(1, 301):  # about 30 steps are enough
        loss = model(ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 20 and step % 10 == 0:
            model.eval()
            if all(greedy(model, tok, prompt, len(answer)) == answer for prompt, answer in rows):
                break
            model.train()
    assert not model.training, "the tiny model did not learn to call the function"
    folder = tmp_path_factory.mktemp("fc") / "run"
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    write_plan(folder)
    return folder


def greedy(model: Any, tokenizer: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy generate from token ids: the new ids (end of turn included)."""
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, repetition_penalty=1.1, pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt):].tolist()


def chat_plan(output_dir: Path, *overrides: str) -> Any:
    """The plan `impruver chat output_dir=... chat.do_sample=false ...` validates."""
    return make_plan(f"output_dir={output_dir}", "chat.do_sample=false", "chat.max_new_tokens=24", *overrides)


def direct_reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], *, max_new_tokens: int = 24,
                 repetition_penalty: float = 1.1) -> str:
    """The reference: plain greedy ``generate`` on the template's prompt, decoded without special tokens."""
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, repetition_penalty=repetition_penalty,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               TOKENIZERS_PARALLELISM="false")
    return env


def impruver_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "impruver", *args]
