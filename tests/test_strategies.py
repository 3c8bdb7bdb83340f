"""Distribution strategies answer for themselves: launch arguments, shards, accelerate plugins, rank-0 logs."""

from __future__ import annotations

import importlib.util
import logging

import pytest
from test_scale import plan_of

from impruver import launch
from impruver.errors import RunError
from impruver.strategies import DataParallel, deepspeed_batch_config, strategy_of

BIG = ["model=rugpt3large", "method=full", "dataset=saiga2"]


def test_each_builtin_strategy_knows_what_it_shards_and_how_it_launches() -> None:
    expected = {"ddp": (set(), "--multi_gpu"), "fsdp": ({"params", "grads", "optimizer"}, "--use_fsdp"),
                "deepspeed_zero2": ({"grads", "optimizer"}, "--use_deepspeed"),
                "deepspeed_zero3": ({"params", "grads", "optimizer"}, "--use_deepspeed")}
    for name, (shards, switch) in expected.items():
        plan = plan_of(f"hardware={name}", *BIG)
        strategy = strategy_of(plan)
        assert strategy.name == name and set(strategy.shards) == shards
        command = launch.launch_command(plan, "p.yaml")
        assert switch in command and command[command.index("-m", command.index(switch)) + 1] == "impruver.worker"
        assert launch.describe(plan)["shards"] == sorted(shards)
    assert strategy_of(plan_of()).name == "none" and not launch.needs_launch(plan_of())


def test_fsdp_plugin_comes_from_the_plan_not_the_launch_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # `accelerate launch --use_fsdp` exports these; read by the plugin they untied GPT-2's embeddings.
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    plugin = strategy_of(plan_of("hardware=cpu_ddp", "hardware.distributed=fsdp")).plugin(
        plan_of("hardware=cpu_ddp", "hardware.distributed=fsdp"))
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading is False and plugin.activation_checkpointing is False
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    profile = strategy_of(plan_of("hardware=fsdp", *BIG)).plugin(plan_of("hardware=fsdp", *BIG))
    assert profile.activation_checkpointing is True  # hardware/fsdp.yaml asks for it
    old_style = plan_of("hardware=fsdp", "+hardware.options.fsdp_sharding_strategy=SHARD_GRAD_OP", *BIG)
    assert strategy_of(old_style).plugin(old_style).reshard_after_forward is False  # FSDP1 name, FSDP2 meaning


def test_fsdp_refuses_an_option_it_does_not_know() -> None:
    plan = plan_of("hardware=fsdp", "+hardware.options.fsdp_shard_everything=true", *BIG)
    with pytest.raises(RunError, match="hardware.options.fsdp_shard_everything"):
        strategy_of(plan).plugin(plan)


def test_deepspeed_gets_its_micro_batch_and_accumulation() -> None:
    plan = plan_of("hardware=deepspeed_zero3", "hardware.num_processes=4", "train.batch_size=3",
                   "train.grad_accum=5", *BIG)
    assert deepspeed_batch_config(plan) == {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 5,
                                            "train_batch_size": 60}
    strategy = strategy_of(plan)
    args = strategy.launch_args(plan)
    assert args[args.index("--zero_stage") + 1] == "3" and args[args.index("--gradient_accumulation_steps") + 1] == "5"
    if importlib.util.find_spec("deepspeed") is None:
        return  # accelerate's DeepSpeedPlugin imports deepspeed; the config above is what it is given
    config = strategy.plugin(plan).deepspeed_config
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["zero_optimization"]["stage"] == 3


def test_data_parallel_merges_its_own_ddp_settings_with_train_ddp() -> None:
    strategy = DataParallel("custom", ddp_kwargs={"static_graph": True, "bucket_cap_mb": 1})
    plan = plan_of("hardware=cpu_ddp", "+train.ddp.ddp_find_unused_parameters=true")
    assert strategy.ddp_arguments(plan) == {"static_graph": True, "bucket_cap_mb": 1, "find_unused_parameters": True}
    bad = plan_of("hardware=cpu_ddp")
    bad = bad.model_copy(update={"train": bad.train.model_copy(update={"ddp": {"ddp_no_such_thing": 1}})})
    with pytest.raises(RunError, match="train.ddp"):
        strategy.accelerator_kwargs(bad)


def test_logs_come_from_rank_zero_other_ranks_only_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    from impruver import ui

    def passes(level: int, rank: str) -> tuple[bool, str]:
        monkeypatch.setenv("RANK", rank)
        record = logging.LogRecord("impruver", level, __file__, 1, "step %d", (3,), None)
        return ui.RankFilter().filter(record), record.getMessage()

    assert passes(logging.INFO, "0") == (True, "step 3")
    assert passes(logging.INFO, "1")[0] is False
    assert passes(logging.WARNING, "1") == (True, "[rank 1] step 3")
    monkeypatch.setenv("RANK", "1")
    assert not ui.interactive(), "no progress bar on other ranks"


def test_the_loss_module_shows_fsdp_the_model_blocks_and_ties_its_weights() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from impruver.train.loss import TokenLoss

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32, n_positions=16))
    wrapped = TokenLoss(model)
    assert set(wrapped._no_split_modules) == {"GPT2Block"}
    model.lm_head.weight = type(model.lm_head.weight)(model.lm_head.weight.detach().clone())  # untied, as a move
    wrapped.tie_weights()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_only_deepspeed_rescales_the_loss_its_engine_divides() -> None:
    for name, scale in (("ddp", 1.0), ("fsdp", 1.0), ("deepspeed_zero2", 4.0)):
        plan = plan_of(f"hardware={name}", "train.grad_accum=4", *BIG)
        assert strategy_of(plan).loss_scale(plan) == scale
