"""Distribution strategies (registry ``strategies``): how a run is spread over processes.

A strategy answers for itself: its ``accelerate launch`` arguments, what it shards (``params``, ``grads``,
``optimizer``), and (for the recipe) how state is saved and loaded. ``hardware.distributed`` names one.

CONTRACT (used by launch, memory and the recipe; implementations may change, these names may not):

    strategy = strategy_of(plan)
    strategy.name: str
    strategy.shards: frozenset[str]          # subset of {"params", "grads", "optimizer"}
    strategy.launch_args(plan) -> list[str]  # accelerate launch arguments after the process counts
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from impruver import registry
from impruver.registry import strategies

if TYPE_CHECKING:
    from impruver.plan import Plan


@dataclass(frozen=True)
class _Strategy:
    """Transitional strategy (to be fleshed out: state saving, FSDP2, DeepSpeed micro-batch)."""

    name: str
    shards: frozenset[str] = frozenset()

    def launch_args(self, plan: Plan) -> list[str]:
        hw = plan.hardware
        if self.name == "fsdp":
            opts: dict[str, Any] = {"fsdp_sharding_strategy": "FULL_SHARD",
                                    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                    "fsdp_activation_checkpointing": True, **hw.options}
            args = ["--use_fsdp"]
            for key, value in opts.items():
                args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
            return args
        if self.name.startswith("deepspeed"):
            return ["--use_deepspeed", "--zero_stage", self.name[-1]]
        # --multi_gpu is accelerate's switch for multi-process data parallel, on CPUs (gloo) as well.
        return ["--multi_gpu"]


for _name, _shards in (("none", frozenset()), ("ddp", frozenset()),
                       ("fsdp", frozenset({"params", "grads", "optimizer"})),
                       ("deepspeed_zero2", frozenset({"grads", "optimizer"})),
                       ("deepspeed_zero3", frozenset({"params", "grads", "optimizer"}))):
    strategies(_name)(_Strategy(_name, _shards))


def strategy_of(plan: Plan) -> Any:
    """The distribution-strategy component of ``plan`` (``hardware.distributed``)."""
    return registry.lookup("strategies", plan.hardware.distributed)


__all__ = ["strategy_of"]
