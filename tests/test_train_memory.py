"""The memory plan: exact parameter counts, sensible components, and a run that stops (proposing settings that
fit) when the estimate exceeds the hardware profile."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_train_presets import plan_of

from impruver.errors import RunError
from impruver.memory import estimate, plan_shape, shape_from_arch, shape_from_hf_config
from impruver.plan import ArchSpec

SHAPES = {
    "gpt2": {"family": "gpt2", "n_layer": 2, "n_embd": 48, "n_head": 4, "n_positions": 64, "vocab_size": 300},
    "llama": {"family": "llama", "n_layer": 2, "n_embd": 48, "n_head": 4, "n_kv_head": 2, "n_positions": 64,
              "vocab_size": 300, "tie_word_embeddings": False},
    "mistral": {"family": "mistral", "n_layer": 2, "n_embd": 48, "n_head": 4, "n_kv_head": 2, "n_inner": 96,
                "n_positions": 64, "vocab_size": 300, "tie_word_embeddings": False, "sliding_window": 32},
    "qwen2": {"family": "qwen2", "n_layer": 2, "n_embd": 48, "n_head": 4, "n_kv_head": 2, "n_inner": 96,
              "n_positions": 64, "vocab_size": 300},
    "qwen3": {"family": "qwen3", "n_layer": 2, "n_embd": 48, "n_head": 4, "n_kv_head": 2, "n_inner": 96,
              "n_positions": 64, "vocab_size": 300, "tie_word_embeddings": False},
}


@pytest.mark.parametrize("family", list(SHAPES))
def test_parameter_count_matches_the_built_model(family: str) -> None:
    from transformers import AutoModelForCausalLM

    from impruver.train.models import config_from_arch

    arch = ArchSpec(**SHAPES[family])
    config = config_from_arch(arch, vocab_size=arch.vocab_size)
    model = AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert shape_from_arch(arch).n_params() == real
    assert shape_from_hf_config(config.to_dict()).n_params() == real


def test_a_head_width_set_apart_from_the_hidden_width_is_counted() -> None:
    """Qwen3 checkpoints set head_dim (128) apart from hidden_size / heads: the count follows the config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=24, intermediate_size=64, vocab_size=300)
    real = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert shape_from_hf_config(config.to_dict()).n_params() == real


def test_known_shapes_have_their_published_sizes() -> None:
    small = shape_from_arch(ArchSpec(family="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50264))
    assert 124e6 < small.n_params() < 127e6
    zephyr = plan_shape(plan_of(["preset=zephyr/7B_lora_python-ru"]))
    assert 7.1e9 < zephyr.n_params() < 7.3e9  # Mistral 7B: 7.24B


def test_components_move_the_way_the_settings_say() -> None:
    plan = plan_of(["preset=rugpt3small/125M_full_fc"])
    base = estimate(plan)
    assert estimate(plan, checkpointing=True)["activations"] < 0.8 * base["activations"]  # logits stay
    assert estimate(plan, optimizer="adamw")["optimizer"] == pytest.approx(4 * base["optimizer"])
    assert estimate(plan, batch_size=1)["activations"] == pytest.approx(base["activations"] / 7)
    lora = plan_of(["preset=rugpt3large/760M_lora_fc"])
    full = plan_of(["preset=rugpt3large/760M_full_fc", "train.batch_size=3"])
    assert estimate(lora)["total"] < estimate(full)["total"]
    assert estimate(lora)["gradients"] < estimate(full)["gradients"] / 5
    assert estimate(lora, method="qlora")["weights"] < estimate(lora)["weights"] / 2
    fsdp = plan_of(["preset=rugpt3large/760M_full_fc", "hardware=fsdp", "hardware.num_processes=4"])
    assert estimate(fsdp)["optimizer"] == pytest.approx(estimate(full)["optimizer"] / 4)


def test_over_budget_run_stops_before_loading_and_proposes_settings_that_fit(tmp_path: Path) -> None:
    from impruver.train.recipe import run

    plan = plan_of(["preset=rugpt3small/125M_full_fc", "train.batch_size=64", "train.optimizer=adamw",
                    f"output_dir={tmp_path}"])
    assert plan.memory.fits is False and plan.memory.suggestions
    for line in plan.memory.suggestions:  # each proposal is a set of overrides whose own estimate fits
        overrides = [o for o in line.split("  (")[0].split() if "=" in o]
        again = plan_of(["preset=rugpt3small/125M_full_fc", "train.batch_size=64", "train.optimizer=adamw",
                         *overrides])
        assert again.memory.fits, line
    with pytest.raises(RunError, match="Settings that fit") as info:
        run(plan)
    assert plan.memory.suggestions[0].split("  (")[0] in str(info.value)
    assert not (tmp_path / "plan.yaml").exists(), "nothing is written or loaded before the checks"
    unchecked = plan_of(["preset=rugpt3small/125M_full_fc", "train.batch_size=64", "train.memory_check=false"])
    from impruver.train.recipe import memory_problem

    assert memory_problem(unchecked) is None
