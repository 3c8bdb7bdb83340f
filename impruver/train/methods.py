"""The built-in training methods (registry ``methods``): scratch, full, lora, qlora.

Each is a :class:`~impruver.components.Method` component: its ``Options`` are the plan's method section, its traits
tell the core what it is (adapter or not, random weights or not, what it needs installed), and it says how the
base is loaded, how the model is wrapped and what it adds to the memory plan. qlora EXTENDS lora (its options,
checks and wrapping), adding the quantized base. Nothing here imports torch or peft at module level.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from impruver.components import Method, MethodMemory, MethodOptions
from impruver.errors import Problem, RunError, choices_hint
from impruver.families import family_name_of, family_named, family_of_module
from impruver.registry import methods

if TYPE_CHECKING:
    from impruver.families import Shape
    from impruver.plan import HardwareSpec, ModelSpec, Plan
    from impruver.train.models import LoadOptions

log = logging.getLogger("impruver")


class _Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoraSpec(_Options):
    """LoRA settings (``method.lora``)."""

    r: int = Field(default=16, gt=0)  # rank: higher = more capacity and memory
    alpha: int = Field(default=16, gt=0)  # scale = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["auto", "all-linear"] = "auto"  # auto: the model family's default
    modules_to_save: list[str] = Field(default_factory=list)  # fully trained modules, e.g. [lm_head]
    use_dora: bool = False
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"


class QuantizationSpec(_Options):
    """How qlora's frozen base is quantized by bitsandbytes (``method.quantization``)."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class LoraOptions(MethodOptions):
    lora: LoraSpec = LoraSpec()


class QLoraOptions(LoraOptions):
    quantization: QuantizationSpec = QuantizationSpec()


# -- every weight trains ---------------------------------------------------------------------------------------


class TrainAll(Method):
    """Every weight trains (no adapter); fp32 master weights under mixed precision."""

    def apply(self, model: Any, plan: Plan) -> Any:
        for param in model.parameters():
            param.requires_grad_(True)
        return model


class Scratch(TrainAll):
    """Train every weight of a model built with random weights (``model.weights`` is forced to random).

    Examples:
        method: {builder: scratch}
    """

    name = "scratch"
    random_init = True


class Full(TrainAll):
    """Full fine-tuning: every weight of a pretrained model (fp32 master weights under mixed precision).

    Examples:
        method: {builder: full}
    """

    name = "full"
    lighter = ("qlora",)


# -- LoRA adapters ---------------------------------------------------------------------------------------------


class Lora(Method):
    """LoRA adapters (peft) on a frozen base: rank, alpha, dropout, targets, modules_to_save, DoRA, rsLoRA.

    Examples:
        method: {builder: lora, lora: {r: 16, alpha: 16, target_modules: auto, modules_to_save: [lm_head]}}
    """

    name = "lora"
    Options: ClassVar[type[MethodOptions]] = LoraOptions
    adapter = True
    lighter = ("qlora",)

    def check(self, plan: Plan) -> list[Problem]:
        """Target modules and modules_to_save must exist in the model's family (when it is known)."""
        lora = self.options(plan).lora
        family = family_named(family_name_of(plan.model))
        if family is None:
            return []
        problems = []
        named = (("target_modules", lora.target_modules if isinstance(lora.target_modules, list) else []),
                 ("modules_to_save", lora.modules_to_save))
        for key, targets in named:
            for i, target in enumerate(targets):
                if target not in family.linear_modules:
                    problems.append(Problem(f"method.lora.{key}[{i}]",
                                            f"'{target}' is not a module of {family.name} models; "
                                            f"{choices_hint(target, sorted(family.linear_modules))}"))
        return problems

    def apply(self, model: Any, plan: Plan) -> Any:
        return self.wrap(model, self.options(plan).lora)

    def wrap(self, model: Any, lora: LoraSpec) -> Any:
        """``model`` with LoRA adapters; only the adapters (and modules_to_save) train."""
        from peft import get_peft_model

        try:
            peft_model = get_peft_model(model, lora_config(lora, model))
        except ValueError as exc:  # e.g. a target module the model does not have
            raise RunError(f"method.lora: {exc}") from None
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in peft_model.parameters())
        log.info("LoRA r=%d on %s: %s trainable of %s parameters (%.2f%%)", lora.r, lora_targets(lora, model),
                 f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
        return peft_model

    def memory(self, shape: Shape, plan: Plan) -> MethodMemory:
        lora = self.options(plan).lora
        family = shape.component
        targets = lora.target_modules if isinstance(lora.target_modules, list) else family.default_lora_targets
        trainable = lora_params(shape, list(targets), lora.r)
        if "lm_head" in lora.modules_to_save:
            trainable += shape.vocab * shape.d
        return MethodMemory(trainable=trainable, base_bytes_per_param=self.base_bytes(plan))

    def base_bytes(self, plan: Plan) -> float:
        """Bytes per frozen base parameter: the dtype the base is loaded in."""
        half = plan.hardware.mixed_precision != "no" or plan.model.dtype in ("bfloat16", "float16")
        return 2.0 if half else 4.0


class QLora(Lora):
    """LoRA on a 4-bit or 8-bit base loaded through bitsandbytes (CUDA only).

    Examples:
        method: {builder: qlora, quantization: {bits: 4, quant_type: nf4}, lora: {r: 16}}
    """

    name = "qlora"
    Options = QLoraOptions
    requires = ("bitsandbytes",)
    lighter = ()

    def check(self, plan: Plan) -> list[Problem]:
        problems = super().check(plan)
        if plan.hardware.device != "cuda":
            problems.append(Problem("method", f"{self.name} loads a 4/8-bit base through bitsandbytes, which needs "
                                    f"CUDA; hardware '{plan.hardware.name}' has none: use method=lora, or "
                                    "hardware=gpu24gb on a GPU"))
        return problems

    def load_with(self, model: ModelSpec, hardware: HardwareSpec, section: Any) -> LoadOptions:
        from dataclasses import replace

        quantization = getattr(section, "quantization", None) or QuantizationSpec()
        return replace(super().load_with(model, hardware, section), quantization=quantization)

    def apply(self, model: Any, plan: Plan) -> Any:
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and freezes the quantized base; checkpointing is switched by train.gradient_checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return super().apply(model, plan)

    def base_bytes(self, plan: Plan) -> float:
        return {4: 0.56, 8: 1.05}[self.options(plan).quantization.bits]  # 4-bit: + block scales


for _method in (Scratch(), Full(), Lora(), QLora()):
    methods(_method.name)(_method)


# -- helpers shared with plugins -------------------------------------------------------------------------------


def load_options(*, method: Any, model: ModelSpec, hardware: HardwareSpec) -> LoadOptions:
    """How the base is loaded for ``method`` (a method section): its component decides."""
    from impruver.components import method_named

    component = method_named(method.builder)
    return component.load_with(model, hardware, method)  # type: ignore[attr-defined]


def lora_params(shape: Shape, targets: list[str], r: int) -> int:
    """Trainable parameters of rank-r adapters on the named linear modules of every layer."""
    per_layer = sum(r * (fan_in + fan_out) for name, fan_in, fan_out in shape.linears() if name in targets)
    return per_layer * shape.n_layer


def lora_targets(lora: LoraSpec, model: Any) -> list[str] | str:
    """The modules adapters go on: the list given, 'all-linear', or the model family's defaults for 'auto'."""
    if isinstance(lora.target_modules, list):
        return list(lora.target_modules)
    family = family_of_module(model)
    if lora.target_modules == "auto" and family is not None:
        return list(family.default_lora_targets)
    return "all-linear"


def lora_config(lora: LoraSpec, model: Any) -> Any:
    """A peft LoraConfig with the family's extra settings (GPT-2's Conv1D layers: fan_in_fan_out).

    Tokens the tokenizer added (rows the base does not have) train as peft trainable tokens, so the adapter saves
    them and loads onto the base exactly, unless the whole embedding is already in modules_to_save.
    """
    from peft import LoraConfig, TaskType

    config = getattr(model, "config", None)
    family = family_of_module(model)
    # A fully trained lm_head / embedding of a tied model must stay tied to its twin (one matrix, two names).
    tied = bool(getattr(config, "tie_word_embeddings", False)) and bool(
        set(lora.modules_to_save) & {"lm_head", "wte", "embed_tokens"})
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora_targets(lora, model), modules_to_save=list(lora.modules_to_save) or None,
        use_dora=lora.use_dora, use_rslora=lora.use_rslora, bias=lora.bias, ensure_weight_tying=tied,
        trainable_token_indices=new_token_ids(model, exclude_if=set(lora.modules_to_save)),
        **(family.lora_config_extra if family else {}),
    )


def new_token_ids(model: Any, *, exclude_if: set[str] | frozenset[str] = frozenset()) -> list[int] | None:
    """Embedding rows the tokenizer added to the base (they must train and be saved with an adapter), unless the
    whole embedding is already trained (``exclude_if`` names an embedding module)."""
    new = getattr(model, "impruver_new_token_ids", None)
    if not new or exclude_if & {"wte", "embed_tokens"}:
        return None
    log.info("the %d tokens added to the tokenizer train as trainable embedding rows", len(new))
    return list(new)


__all__ = ["Full", "Lora", "LoraOptions", "LoraSpec", "QLora", "QLoraOptions", "QuantizationSpec", "Scratch",
           "TrainAll", "load_options", "lora_config", "lora_params", "lora_targets", "new_token_ids"]
