"""Every shipped preset and every option of every config group composes and plans (offline, no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from impruver.compose import compose, list_options
from impruver.plan import Plan, make_plan

CONF = Path(__file__).resolve().parents[1] / "conf"
CATALOGUE = [
    "ruGPT-3.5/13B_lora_saiga2", "ruGPT-3.5/13B_lora_fc", "nanoGPT/30M_full_alpaca",
    "rugpt3large/760M_full_saiga2", "rugpt3large/760M_lora_saiga2", "rugpt3large/760M_full_fc",
    "rugpt3large/760M_lora_fc", "rugpt3medium/457M_full_saiga2", "rugpt3medium/457M_full_fc",
    "rugpt3small/125M_full_saiga2", "rugpt3small/125M_full_fc", "zephyr/7B_lora_python-ru",
    "rugpt3large/760M_lora_saiga2_dpo", "rugpt3large/760M_lora_saiga2_orpo",
]


def plan_of(*overrides: str) -> Plan:
    composed = compose(list(overrides))
    return make_plan(composed.config, choices=composed.choices)


def test_every_catalogue_preset_ships() -> None:
    assert set(list_options("preset")) == {*CATALOGUE, "demo"}


@pytest.mark.parametrize("preset", [*CATALOGUE, "demo"])
def test_preset_plans(preset: str) -> None:
    plan = plan_of(f"preset={preset}")
    assert plan.preset == preset
    assert plan.output_dir == f"outputs/{preset}"
    assert plan.memory is not None, "every shipped preset knows its architecture, so it has a memory estimate"
    assert plan.memory.total_gib > 0


@pytest.mark.parametrize("preset", [*CATALOGUE, "demo"])
def test_preset_file_names_its_command(preset: str) -> None:
    lines = (CONF / "preset" / f"{preset}.yaml").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# @package _global_"
    assert any(f"impruver preset={preset}" in line for line in lines[1:4]), lines[:4]


def test_catalogue_values_are_the_recipes() -> None:
    plan = plan_of("preset=ruGPT-3.5/13B_lora_saiga2")
    assert plan.model.path == "ai-forever/ruGPT-3.5-13B"
    assert plan.method.builder == "qlora" and plan.method.quantization.bits == 4
    assert (plan.method.lora.r, plan.method.lora.alpha, plan.method.lora.dropout) == (16, 16, 0.05)
    assert plan.method.lora.target_modules == ["c_attn", "c_fc", "c_proj"]
    assert (plan.train.batch_size, plan.train.grad_accum, plan.train.lr) == (1, 128, 2e-4)
    assert plan.train.optimizer == "adamw_8bit" and plan.train.weight_decay == 0.08
    assert plan.max_tokens == 1024

    nano = plan_of("preset=nanoGPT/30M_full_alpaca")
    assert nano.method.builder == "scratch" and nano.model.weights == "random"
    assert nano.model.arch.n_layer == 6 and nano.model.arch.vocab_size == 50304 and nano.model.arch.dropout == 0.2
    assert nano.model.dtype == "bfloat16"  # the recipe's fp16 slip is fixed
    assert nano.tokenizer.special_tokens == {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>",
                                             "unk_token": "<unk>"}
    assert nano.dataset.sources["ru_turbo_alpaca"].only_target_loss is False
    assert (nano.train.max_steps, nano.train.betas) == (5000, (0.9, 0.99))

    lora_saiga = plan_of("preset=rugpt3large/760M_lora_saiga2")
    assert lora_saiga.method.quantization.bits == 8 and lora_saiga.method.lora.modules_to_save == ["lm_head"]
    zephyr = plan_of("preset=zephyr/7B_lora_python-ru")
    assert zephyr.method.lora.target_modules == ["q_proj", "v_proj"] and zephyr.train.eval_steps == 500
    assert zephyr.dataset.sources["ru_stackoverflow_py"].mapping == {"вопрос": "instruction", "ответ": "output"}
    assert not zephyr.dataset.sources["ru_stackoverflow_py"].add_bos
    saiga2 = plan_of("dataset=saiga2")
    assert not saiga2.dataset.sources["gpt_roleplay_realm"].enabled
    assert set(saiga2.sources) == {"ru_turbo_alpaca", "ru_turbo_alpaca_evol_instruct", "ru_turbo_saiga",
                                   "ru_sharegpt_cleaned", "oasst1_ru_main_branch", "ru_instruct_gpt4"}


def _group_cases() -> list[tuple[str, str]]:
    return [(g, o) for g in ("model", "tokenizer", "dataset", "method", "hardware", "train", "chat")
            for o in list_options(g)]


@pytest.mark.parametrize(("group", "option"), _group_cases())
def test_every_group_option_plans(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}"]
    if (group, option) == ("model", "local"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2,
                                                          "n_head": 2, "vocab_size": 100}))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
        overrides += [f"model.path={tmp_path}", "method=full"]
    if (group, option) == ("tokenizer", "hf"):
        overrides.append("tokenizer.path=ai-forever/rugpt3small_based_on_gpt2")
    if (group, option) == ("hardware", "multinode"):
        overrides.append("hardware.main_process_ip=10.1.2.3")
    if (group, option) == ("method", "qlora"):
        overrides.append("hardware=gpu24gb")
    if group == "dataset" and "preference" in option:  # pairs: planned with a preference objective
        overrides.append("objective=dpo")
    plan = plan_of(*overrides)
    assert plan.choices[group] == option


def test_no_arguments_is_the_demo_preset() -> None:
    bare, demo = plan_of(), plan_of("preset=demo")
    assert bare == demo
    assert bare.output_dir == "outputs/demo"
    assert (bare.model.builder, bare.method.builder, bare.tokenizer.builder) == ("arch", "scratch", "bpe")
    assert bare.hardware.device == "cpu"


def test_key_overrides_keep_the_demo() -> None:
    plan = plan_of("train.lr=1e-3", "train.max_steps=2")
    assert plan.preset == "demo" and plan.train.lr == 1e-3 and plan.train.max_steps == 2


def test_canonical_form() -> None:
    plan = plan_of("model=rugpt3large", "method=lora", "dataset=saiga2", "method.lora.r=8", "train.lr=1e-4")
    assert plan.model.path == "ai-forever/rugpt3large_based_on_gpt2"
    assert plan.tokenizer.builder == "hf" and plan.tokenizer.path == plan.model.path  # tokenizer: the model's
    assert plan.tokenizer.chat_template == "saiga"  # rugpt3 ships none: the model option names one
    assert plan.method.lora.r == 8 and plan.train.lr == 1e-4
    assert plan.output_dir == "outputs/rugpt3large_lora_saiga2"
    assert plan.train_path == "outputs/rugpt3large_lora_saiga2/data/train.jsonl"
