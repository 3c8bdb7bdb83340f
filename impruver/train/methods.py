"""Method builders (registry ``methods``): what is trained, and how the base model is loaded for it.

A method builder takes the plan's :class:`~impruver.plan.MethodSpec` as ``spec`` and the loaded ``model`` and
returns the model to train (the same module with everything trainable, or a peft model whose only trainable
weights are the adapters). :func:`load_options` says how the base must be loaded for the method (dtype,
quantization) before the builder runs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from impruver.errors import RunError
from impruver.memory import default_lora_targets
from impruver.registry import methods
from impruver.train.models import LoadOptions

if TYPE_CHECKING:
    from impruver.plan import HardwareSpec, LoraSpec, MethodSpec, ModelSpec

log = logging.getLogger("impruver")
ADAPTER_METHODS = ("lora", "qlora")


def load_options(*, method: MethodSpec, model: ModelSpec, hardware: HardwareSpec) -> LoadOptions:
    """The dtype (and quantization) to load the base in.

    Full fine-tuning and scratch training keep fp32 master weights whenever mixed precision is on (the forward
    runs under bf16/fp16 autocast); without mixed precision an explicit ``model.dtype`` is honoured (pure
    half-precision training). Adapter methods load the frozen base in half precision on a GPU (``auto``) and
    keep the adapters in fp32.
    """
    half = {"bf16": "bfloat16", "fp16": "float16"}.get(hardware.mixed_precision)
    if method.builder in ADAPTER_METHODS:
        dtype = model.dtype if model.dtype != "auto" else (half or "float32")
    elif half is not None:
        dtype = "float32"
    else:
        dtype = model.dtype if model.dtype != "auto" else "float32"
    quant = method.quantization if method.builder == "qlora" else None
    return LoadOptions(dtype=dtype, quantization=quant, device=hardware.device)


def _train_all(model: Any) -> Any:
    for param in model.parameters():
        param.requires_grad_(True)
    return model


@methods("scratch")
def scratch(*, spec: MethodSpec, model: Any) -> Any:
    """Train every weight of a model built with random weights (``model.weights`` is forced to random)."""
    return _train_all(model)


@methods("full")
def full(*, spec: MethodSpec, model: Any) -> Any:
    """Full fine-tuning: every weight of a pretrained model (fp32 master weights under mixed precision)."""
    return _train_all(model)


def lora_targets(lora: LoraSpec, model: Any) -> list[str] | str:
    """The modules adapters go on: the list given, 'all-linear', or per-architecture defaults for 'auto'."""
    if isinstance(lora.target_modules, list):
        return list(lora.target_modules)
    if lora.target_modules == "all-linear":
        return "all-linear"
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family in ("gpt2", "llama", "mistral", "qwen2", "qwen3"):
        return default_lora_targets(family)
    return "all-linear"


def lora_config(lora: LoraSpec, model: Any) -> Any:
    """A peft LoraConfig; GPT-2's Conv1D layers store weights transposed, hence fan_in_fan_out.

    Tokens the tokenizer added (rows the base does not have) train as peft trainable tokens, so the adapter saves
    them and loads onto the base exactly, unless the whole embedding is already in modules_to_save.
    """
    from peft import LoraConfig, TaskType

    config = getattr(model, "config", None)
    is_gpt2 = getattr(config, "model_type", None) == "gpt2"
    # A fully trained lm_head / embedding of a tied model must stay tied to its twin (one matrix, two names).
    tied = bool(getattr(config, "tie_word_embeddings", False)) and bool(
        set(lora.modules_to_save) & {"lm_head", "wte", "embed_tokens"})
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora_targets(lora, model), modules_to_save=list(lora.modules_to_save) or None,
        use_dora=lora.use_dora, use_rslora=lora.use_rslora, bias=lora.bias, fan_in_fan_out=is_gpt2,
        ensure_weight_tying=tied, trainable_token_indices=_new_tokens(lora, model),
    )


def _new_tokens(lora: LoraSpec, model: Any) -> list[int] | None:
    new = getattr(model, "impruver_new_token_ids", None)
    if not new or set(lora.modules_to_save) & {"wte", "embed_tokens"}:
        return None
    log.info("LoRA: the %d tokens added to the tokenizer train as trainable embedding rows", len(new))
    return list(new)


def _wrap_lora(spec: MethodSpec, model: Any) -> Any:
    from peft import get_peft_model

    if spec.lora is None:
        raise RunError("method.lora: LoRA settings are missing (r, alpha, target_modules)")
    try:
        peft_model = get_peft_model(model, lora_config(spec.lora, model))
    except ValueError as exc:  # e.g. a target module the model does not have
        raise RunError(f"method.lora: {exc}") from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d on %s: %s trainable of %s parameters (%.2f%%)", spec.lora.r,
             lora_targets(spec.lora, model), f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return peft_model


@methods("lora")
def lora(*, spec: MethodSpec, model: Any) -> Any:
    """LoRA adapters (peft) on a frozen base: rank, alpha, dropout, targets, modules_to_save, DoRA, rsLoRA.

    Examples:
        method: {builder: lora, lora: {r: 16, alpha: 16, target_modules: auto, modules_to_save: [lm_head]}}
    """
    return _wrap_lora(spec, model)


@methods("qlora")
def qlora(*, spec: MethodSpec, model: Any) -> Any:
    """LoRA on a 4-bit or 8-bit base loaded through bitsandbytes (CUDA only).

    Examples:
        method: {builder: qlora, quantization: {bits: 4, quant_type: nf4}, lora: {r: 16}}
    """
    from peft import prepare_model_for_kbit_training

    # Casts norms to fp32 and freezes the quantized base; checkpointing is switched by train.gradient_checkpointing.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _wrap_lora(spec, model)
