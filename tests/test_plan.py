"""Validation into a plan: every problem at once, with the key, the bad value and the valid choices."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from impruver.compose import compose
from impruver.errors import ConfigError
from impruver.plan import Plan, load_plan, make_plan, redact


def plan_of(*overrides: str) -> Plan:
    composed = compose(list(overrides))
    return make_plan(composed.config, choices=composed.choices)


def problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        plan_of(*overrides)
    return [str(p) for p in info.value.problems]


def test_unknown_group_option_names_the_closest() -> None:
    (problem,) = problems("model=rugpt3lage")
    assert "rugpt3lage" in problem and "did you mean 'rugpt3large'" in problem


def test_every_problem_is_reported_at_once() -> None:
    found = problems("model=rugpt3large", "method=lora", "dataset=saiga2", "method.lora.rr=8", "train.lr=abc", "train.batch_size=-1",
                     "hardware=gpu80gb", "hardware.distributed=zero9", "dataset.sources.ru_turbo_saiga.format=saig")
    text = "\n".join(found)
    assert "method.lora.rr" in text and "did you mean 'r'" in text
    assert "train.lr" in text and "'abc'" in text
    assert "train.batch_size" in text
    assert "hardware.distributed" in text and "ddp" in text
    assert "dataset.sources.ru_turbo_saiga.format" in text and "did you mean 'saiga'" in text
    assert len(found) == 5


def test_bad_group_choices_and_bad_syntax_are_all_reported() -> None:
    found = problems("model=rugpt3lage", "dataset=saiga3", "train.lr=[1,")
    assert len(found) == 3


def test_lora_targets_must_exist_in_the_architecture() -> None:
    (problem,) = problems("model=rugpt3large", "method=lora", "method.lora.target_modules=[q_proj,c_attn]")
    assert "method.lora.target_modules[0]" in problem and "'q_proj'" in problem and "gpt2" in problem


def test_qlora_needs_a_gpu_profile() -> None:
    found = problems("model=rugpt3large", "method=qlora", "hardware=cpu")
    assert any("qlora" in p and "CUDA" in p for p in found)


def test_lora_settings_with_another_method_are_a_contradiction() -> None:
    found = problems("model=rugpt3large", "method=full", "+method.lora.r=8")
    assert any("method.lora" in p and "method=lora" in p for p in found)


def test_a_method_chosen_under_a_preset_that_sets_another_builder_gets_the_fix() -> None:
    """preset=demo objective=dpo sets method.builder=full over the chosen group (a config selected by interpolation
    cannot override a group); the user who chose method=lora is told to name the builder, not to choose lora."""
    (problem,) = problems("preset=demo", "objective=dpo", "method=lora")
    assert "method=lora was chosen" in problem and "add method.builder=lora" in problem
    plan = plan_of("preset=demo", "objective=dpo", "method=lora", "method.builder=lora")
    assert plan.method.builder == "lora" and plan.objective.name == "dpo"


def test_local_tokenizer_without_template(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    found = problems("model=local", f"model.path={tmp_path}", "method=full")
    assert any("tokenizer.chat_template" in p and "saiga" in p for p in found)
    assert plan_of("model=local", f"model.path={tmp_path}", "method=full", "tokenizer.chat_template=zephyr")


def test_missing_required_value_is_named() -> None:
    found = problems("model=local")
    assert any(p.startswith("model.path") for p in found)


def test_unknown_top_level_key() -> None:
    found = problems("+outptu_dir=x")
    assert any("outptu_dir" in p and "output_dir" in p for p in found)


def test_plan_round_trips_through_yaml(tmp_path: Path) -> None:
    plan = plan_of("model=rugpt3large", "method=lora", "dataset=saiga2", f"output_dir={tmp_path}")
    path = plan.write()
    assert path == tmp_path / "plan.yaml"
    assert load_plan(tmp_path) == plan
    assert not list(tmp_path.glob(".*tmp*")), "atomic write leaves no temporary file"


def test_plan_is_frozen() -> None:
    plan = plan_of()
    with pytest.raises(Exception):
        plan.train.lr = 1.0  # type: ignore[misc]


def test_secrets_never_reach_the_plan() -> None:
    data = redact({"train": {"wandb_api_key": "abc123", "max_new_tokens": 5}, "hf_token": "hf_x",
                   "tokenizer": {"special_tokens": {"pad_token": "<pad>"}}})
    assert data["train"]["wandb_api_key"] == "***" and data["hf_token"] == "***"
    assert data["train"]["max_new_tokens"] == 5 and data["tokenizer"]["special_tokens"]["pad_token"] == "<pad>"


def test_planning_is_offline_and_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    plan_of("model=rugpt3large", "method=lora", "dataset=saiga2")  # warm imports and the plugin registry

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("planning must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    start = time.process_time()  # CPU time of this process: other load on the machine does not count
    plan = plan_of("model=rugpt3large", "method=lora", "dataset=saiga2")
    elapsed = time.process_time() - start
    assert plan.model.path == "ai-forever/rugpt3large_based_on_gpt2"
    assert elapsed < 0.5, f"planning took {elapsed:.2f}s of CPU"


def test_planning_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, impruver; impruver.build_plan(['model=rugpt3large','method=lora','dataset=saiga2']);"
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules];"
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_memory_estimate_and_suggestions() -> None:
    fits = plan_of("preset=rugpt3small/125M_full_saiga2")
    assert fits.memory.budget_gib == 22.0
    big = plan_of("preset=rugpt3large/760M_full_saiga2", "train.batch_size=16")
    assert big.memory.fits is False
    assert big.memory.suggestions and all("GiB" in s for s in big.memory.suggestions)


def test_top_level_shorthands_of_the_recipe_catalogue() -> None:
    plan = plan_of("+resume=auto", "+ddp.ddp_find_unused_parameters=false")
    assert plan.train.resume == "auto"
    assert plan.train.ddp == {"ddp_find_unused_parameters": False}
    found = problems("+ddp.ddp_find_unused_parameter=false")
    assert any("train.ddp.ddp_find_unused_parameter" in p and "ddp_find_unused_parameters" in p for p in found)


def test_public_api_survives_submodule_imports() -> None:
    import impruver
    import impruver.compose  # noqa: F401  (once shadowed a function of the same name)
    import impruver.plan  # noqa: F401

    plan = impruver.build_plan(["preset=demo"])
    assert plan.preset == "demo"
    assert impruver.compose_config(["preset=demo"]).choices["preset"] == "demo"
