"""Every catalogue preset plans with a memory estimate, and a tiny-shaped, random-weight override of each trains
2 steps on the CPU (its own Hub data and tokenizer replaced by local ones, qlora by lora, 8-bit AdamW by AdamW)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train_support import make_tokenizer

from impruver.compose import compose, list_options
from impruver.plan import make_plan



def plan_of(overrides: list[str]):
    composed = compose(overrides)
    return make_plan(composed.config, choices=composed.choices)


PRESETS = [p for p in list_options("preset") if p != "demo"]
DEMO_CHATS = "pkg://impruver/assets/demo/chats.jsonl"
DEMO_PAIRS = "pkg://impruver/assets/demo/preferences.jsonl"  # for presets whose objective trains on pairs


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    return folder


def tiny_overrides(preset: str, out: Path, tok_dir: Path) -> list[str]:
    """Overrides that shrink a preset to a CPU smoke run of 2 steps."""
    config = compose([f"preset={preset}"]).config
    family = config["model"]["arch"]["family"]
    shape = ["model.arch.n_layer=1", "model.arch.n_embd=32", "model.arch.n_head=2", "model.arch.n_positions=128"]
    if family != "gpt2":
        shape += ["model.arch.n_kv_head=1", "model.arch.n_inner=64", "++model.arch.sliding_window=null"]
    disable = [f"dataset.sources.{name}.enabled=false" for name in config["dataset"]["sources"]]
    method = ["method=lora"] if config["method"]["builder"] == "qlora" else []
    if method and config["method"].get("quantization"):
        method.append("~method.quantization")
    pairs = config.get("objective", {}).get("name", "sft") != "sft"
    data, data_format = (DEMO_PAIRS, "trl_preference") if pairs else (DEMO_CHATS, "openai")
    base = ["model.path=null"] if pairs else []  # the SFT output it starts from does not exist here
    return [
        f"preset={preset}", *method, "hardware=cpu", "model.weights=random", "model.dtype=float32", *shape, *base,
        f"tokenizer.path={tok_dir}", *disable,
        f"+dataset.sources.local.path={data}", f"+dataset.sources.local.format={data_format}",
        "+dataset.sources.local.limit=40", "dataset.max_tokens=96", "dataset.num_proc=1", "dataset.val_size=4",
        "train.optimizer=adamw", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1",
        "train.warmup_steps=0", f"output_dir={out}",
    ]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_plans_with_a_memory_estimate(preset: str) -> None:
    plan = plan_of([f"preset={preset}"])
    assert plan.memory is not None and plan.memory.total_gib > 0
    assert plan.memory.budget_gib is not None  # every catalogue preset names a GPU profile


@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_random_weight_override_trains_two_steps_on_cpu(preset: str, tmp_path: Path, tok_dir: Path) -> None:
    from impruver.jobs import train_job as run  # composes the data, freezes the plan, trains

    plan = plan_of(tiny_overrides(preset, tmp_path / "out", tok_dir))
    assert plan.model.weights == "random" and plan.hardware.device == "cpu"
    summary = run(plan)
    assert summary["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2]
    expected = "adapter_model.safetensors" if plan.method.builder == "lora" else "model.safetensors"
    assert (tmp_path / "out" / expected).is_file()
