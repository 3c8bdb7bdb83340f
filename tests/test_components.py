"""Components answer for themselves: method components (options, traits, checks, loading, memory), model
families (shapes, configs, LoRA targets) and tokenizer builders (needs_texts), and the plan as a package
(version check, no torch, no cycle)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_train_presets import plan_of

from impruver import registry
from impruver.components import MethodComponent, method_named, method_of, tokenizer_needs_texts
from impruver.errors import ConfigError
from impruver.families import ModelFamily, family_named


def test_builtin_methods_are_components_with_their_own_options() -> None:
    for name in ("scratch", "full", "lora", "qlora"):
        assert isinstance(method_named(name), MethodComponent), name
    traits = {n: (method_named(n).adapter, method_named(n).random_init) for n in ("scratch", "full", "lora", "qlora")}
    assert traits == {"scratch": (False, True), "full": (False, False), "lora": (True, False), "qlora": (True, False)}
    lora, qlora = method_named("lora").Options, method_named("qlora").Options
    assert issubclass(qlora, lora) and set(qlora.model_fields) == {"builder", "lora", "quantization"}
    assert method_named("qlora").requires == ("bitsandbytes",)


def test_qlora_config_holds_only_what_it_changes_and_extends_lora() -> None:
    from impruver.conf import __file__ as conf_init

    text = (Path(conf_init).parent / "method" / "qlora.yaml").read_text()
    assert "- lora" in text and "\n  r:" not in text  # its LoRA settings come from method/lora
    plan = plan_of(["model=rugpt3large", "method=qlora", "hardware=gpu24gb", "method.lora.r=8"])
    assert type(plan.method).__name__ == "QLoraOptions"
    assert plan.method.lora.r == 8 and plan.method.quantization.bits == 4


def test_an_option_of_another_method_names_its_owner() -> None:
    with pytest.raises(ConfigError) as info:
        plan_of(["model=rugpt3large", "method=scratch", "+method.quantization.bits=4"])
    assert "method.quantization" in str(info.value) and "method=qlora" in str(info.value)


def test_the_plan_reads_back_as_the_methods_own_schema(tmp_path: Path) -> None:
    from impruver.plan import load_plan

    plan = plan_of(["model=rugpt3large", "method=lora", "method.lora.r=4", f"output_dir={tmp_path}"])
    plan.write()
    again = load_plan(tmp_path)
    assert again == plan and type(again.method) is type(plan.method) and again.method.lora.r == 4


def test_a_plan_of_another_version_is_refused_with_the_fix(tmp_path: Path) -> None:
    from impruver.plan import load_plan

    plan = plan_of(["model=rugpt3large", "method=lora", f"output_dir={tmp_path}"])
    path = plan.write()
    path.write_text(path.read_text().replace(f"version: {plan.version}", "version: 1", 1))
    with pytest.raises(ConfigError, match="plan version 1.*plan the run again"):
        load_plan(tmp_path)


def test_unknown_family_and_strategy_list_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as info:
        plan_of(["preset=nanoGPT/30M_full_alpaca", "model.arch.family=lama", "hardware.distributed=fsdb"])
    text = str(info.value)
    assert "model.arch.family" in text and "did you mean 'llama'" in text
    assert "hardware.distributed" in text and "did you mean 'fsdp'" in text


def test_lora_memory_counts_what_peft_trains() -> None:
    """The method's own memory figure against peft's count on the real module (an independent reference)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from impruver.families import Shape
    from impruver.memory import plan_shape
    from impruver.train.methods import lora_config
    from impruver.train.models import config_from_arch

    for family in ("gpt2", "llama", "qwen3"):
        arch = {"family": family, "n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 64, "vocab_size": 300}
        plan = plan_of(["preset=nanoGPT/30M_full_alpaca", "method=lora", "method.lora.r=4",
                        *[f"++model.arch.{k}={v}" for k, v in arch.items()], "++model.arch.n_kv_head=null",
                        "++model.arch.n_inner=null", "++model.arch.sliding_window=null"])
        shape: Shape = plan_shape(plan)
        model = AutoModelForCausalLM.from_config(config_from_arch(plan.model.arch, vocab_size=300))
        assert shape.n_params() == sum(p.numel() for p in model.parameters()), family
        peft_model = get_peft_model(model, lora_config(plan.method.lora, model))
        assert method_of(plan).memory(shape, plan).trainable == peft_model.get_nb_trainable_parameters()[0], family
        assert plan.memory.trainable_params == peft_model.get_nb_trainable_parameters()[0]


def test_families_answer_for_their_models() -> None:
    for name in ("gpt2", "llama", "mistral", "qwen2", "qwen3"):
        family = family_named(name)
        assert isinstance(family, ModelFamily) and family.head_on_targets
        assert set(family.default_lora_targets) <= family.linear_modules
    assert family_named("gpt2").lora_config_extra == {"fan_in_fan_out": True}
    assert family_named("phi3") is None  # not shipped: the example plugin adds it


def test_tokenizer_builders_say_whether_they_train_on_the_data() -> None:
    assert tokenizer_needs_texts("bpe") and not tokenizer_needs_texts("hf")


def test_machine_probes_ask_the_components(monkeypatch: pytest.MonkeyPatch) -> None:
    from impruver.plan import environment_problems
    from impruver.train.methods import Lora

    plan = plan_of(["model=rugpt3large", "method=lora"])
    # (its Hub ids are not on this machine either: those problems are tested in test_download.py)
    packages = lambda: [p for p in environment_problems(plan) if not p.key.endswith(".path")]  # noqa: E731
    assert packages() == []
    monkeypatch.setattr(Lora, "requires", ("surely_not_installed_pkg",))
    (problem,) = packages()
    assert problem.key == "method" and "surely_not_installed_pkg" in problem.message


def test_builtins_load_without_errors_and_planning_imports_no_training_modules() -> None:
    assert registry.load_plugins() == {}
    code = ("import sys, impruver.plan, impruver.memory, impruver.components, impruver.families;"
            "from impruver import registry; registry.names('methods');"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
