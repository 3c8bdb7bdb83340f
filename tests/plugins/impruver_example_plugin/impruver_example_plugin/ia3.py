"""An adapter method impruver does not ship: IA3 (peft), learned scaling vectors on chosen linear layers.

Registered through the entry-point group ``impruver_methods`` (see this plugin's pyproject.toml), it gets exactly
what a built-in method gets: its options validated by ``IA3Options`` (``method.builder=ia3
method.target_modules=[c_attn]``), its checks, a half-precision frozen base on a GPU (``adapter = True``), a peft
adapter folder that ``impruver chat`` loads and ``impruver export`` merges, and a memory estimate that counts
only its own vectors.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from impruver.components import Method, MethodMemory, MethodOptions
from impruver.errors import Problem, choices_hint
from impruver.families import family_name_of, family_named, family_of_module


class IA3Options(MethodOptions):
    """``method:`` keys of ia3."""

    target_modules: list[str] | None = None  # None: the model family's default LoRA targets (every block linear)
    feedforward_modules: list[str] = Field(default_factory=list)  # of the targets: scaled on their input side


class IA3(Method):
    """IA3 adapters (peft): one learned vector per target module, scaling its output (or, for feedforward
    modules, its input); the base stays frozen.

    Examples:
        method: {builder: ia3, target_modules: [c_attn, c_proj], feedforward_modules: [c_proj]}
    """

    name = "ia3"
    Options = IA3Options
    adapter = True

    def check(self, plan: Any) -> list[Problem]:
        options = self.options(plan)
        problems = []
        family = family_named(family_name_of(plan.model))
        for i, target in enumerate(options.target_modules or []):
            if family is not None and target not in family.linear_modules:
                problems.append(Problem(f"method.target_modules[{i}]", f"'{target}' is not a module of "
                                        f"{family.name} models; {choices_hint(target, sorted(family.linear_modules))}"))
        targets = set(options.target_modules or (family.default_lora_targets if family else ()))
        for i, module in enumerate(options.feedforward_modules):
            if targets and module not in targets:
                problems.append(Problem(f"method.feedforward_modules[{i}]",
                                        f"'{module}' must also be one of the target modules ({', '.join(sorted(targets))})"))
        return problems

    def apply(self, model: Any, plan: Any) -> Any:
        from peft import IA3Config, get_peft_model

        options = self.options(plan)
        family = family_of_module(model)
        targets = options.target_modules or (list(family.default_lora_targets) if family else "all-linear")
        # The family's layer settings peft needs (GPT-2's Conv1D: fan_in_fan_out) apply to IA3 as to LoRA.
        extra = {k: v for k, v in (family.lora_config_extra if family else {}).items() if k == "fan_in_fan_out"}
        config = IA3Config(task_type="CAUSAL_LM", target_modules=targets,
                           feedforward_modules=list(options.feedforward_modules), **extra)
        return get_peft_model(model, config)

    def memory(self, shape: Any, plan: Any) -> MethodMemory:
        options = self.options(plan)
        targets = set(options.target_modules or shape.component.default_lora_targets)
        feedforward = set(options.feedforward_modules)
        # One vector per target module: its input width for feedforward modules, else its output width.
        per_layer = sum(fan_in if name in feedforward else fan_out
                        for name, fan_in, fan_out in shape.linears() if name in targets)
        half = plan.hardware.mixed_precision != "no" or plan.model.dtype in ("bfloat16", "float16")
        return MethodMemory(trainable=per_layer * shape.n_layer, base_bytes_per_param=2.0 if half else 4.0)


ia3 = IA3()
