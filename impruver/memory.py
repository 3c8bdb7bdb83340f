"""Peak GPU memory per device, estimated from the plan before anything loads.

The model: weights + gradients + optimizer state (sharded by FSDP / DeepSpeed where configured) + activations of
one micro-batch + logits + a fixed CUDA overhead. Activation bytes per token per layer follow Korthikanti et al.
(2022) with a memory-efficient attention kernel (no seq^2 term): about 34 x hidden bytes in 16-bit precision,
and about 2 x hidden bytes with gradient checkpointing (only the layer inputs are kept, one layer is recomputed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from impruver.plan import ArchSpec, Plan

GIB = 1024**3
CUDA_OVERHEAD_GIB = 0.75  # context, cuBLAS workspaces, allocator slack
FRAGMENTATION = 1.10
BYTES_PER_PARAM_STATE = {  # optimizer state per trainable parameter
    "adamw": 8.0,
    "adamw_fused": 8.0,
    "adamw_8bit": 2.0,
    "paged_adamw_8bit": 2.0,
    "sgd": 0.0,
}


@dataclass(frozen=True)
class Shape:
    """The numbers of an architecture that memory depends on."""

    family: str
    n_layer: int
    d: int
    n_head: int
    n_kv_head: int
    ff: int
    vocab: int
    positions: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.d // self.n_head

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of one layer, by module name."""
        d, ff, kv = self.d, self.ff, self.n_kv_head * self.head_dim
        if self.family == "gpt2":
            # c_proj appears in attention (d->d) and MLP (ff->d); counted under both names below.
            return {"c_attn": (d, 3 * d), "c_proj": (d, d), "c_fc": (d, ff), "c_proj_mlp": (ff, d)}
        return {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
                "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}

    def n_params(self) -> int:
        """Exactly what transformers builds for this shape (checked against the real modules in the tests)."""
        if self.family == "gpt2":
            # Conv1D layers with biases; two LayerNorms (weight + bias) per block, one at the end.
            per_layer = sum(i * o + o for i, o in self.linear_shapes().values()) + 4 * self.d
            final_norm = 2 * self.d
            embed = self.vocab * self.d + self.positions * self.d
        else:
            # Llama family: no biases (Qwen2 has them on q/k/v); RMSNorm weights only.
            per_layer = sum(i * o for i, o in self.linear_shapes().values()) + 2 * self.d
            if self.family == "qwen2":
                per_layer += self.d + 2 * self.n_kv_head * self.head_dim
            if self.family == "qwen3":
                per_layer += 2 * self.head_dim  # q_norm and k_norm
            final_norm = self.d
            embed = self.vocab * self.d
        head = 0 if self.tied else self.vocab * self.d
        return self.n_layer * per_layer + embed + head + final_norm

    def n_params_non_embedding(self) -> int:
        """Parameters that take part in the 6N FLOPs per token (position embeddings excluded)."""
        return self.n_params() - (self.positions * self.d if self.family == "gpt2" else 0)


def shape_from_arch(arch: ArchSpec) -> Shape:
    # The MLP width impruver.train.models builds when n_inner is not given (llama: 8/3 d rounded up to 256).
    ff = arch.n_inner or (4 * arch.n_embd if arch.family == "gpt2" else 256 * ((int(8 * arch.n_embd / 3) + 255) // 256))
    return Shape(arch.family, arch.n_layer, arch.n_embd, arch.n_head, arch.n_kv_head or arch.n_head, ff,
                 arch.vocab_size, arch.n_positions, arch.tie_word_embeddings)


def shape_from_hf_config(config: dict[str, Any]) -> Shape | None:
    """Read a transformers config.json (gpt2 or llama-family keys)."""
    kind = config.get("model_type")
    if kind == "gpt2":
        d = config["n_embd"]
        return Shape("gpt2", config["n_layer"], d, config["n_head"], config["n_head"],
                     config.get("n_inner") or 4 * d, config["vocab_size"], config.get("n_positions", 1024), True)
    if kind in ("llama", "mistral", "qwen2", "qwen3"):
        return Shape(kind, config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
                     config.get("num_key_value_heads") or config["num_attention_heads"],
                     config["intermediate_size"], config["vocab_size"],
                     config.get("max_position_embeddings", 2048), bool(config.get("tie_word_embeddings", False)))
    return None


def plan_shape(plan: Plan) -> Shape | None:
    """The architecture of the plan's model, when it is known without loading anything."""
    if plan.model.arch is not None:
        return shape_from_arch(plan.model.arch)
    if plan.model.path and Path(plan.model.path, "config.json").is_file():
        try:
            return shape_from_hf_config(json.loads(Path(plan.model.path, "config.json").read_text()))
        except (KeyError, ValueError, OSError):
            return None
    return None


def lora_params(shape: Shape, targets: list[str], r: int) -> int:
    """Trainable parameters of rank-r adapters on the named modules of every layer."""
    total = 0
    for name, (fan_in, fan_out) in shape.linear_shapes().items():
        if name.removesuffix("_mlp") in targets:
            total += r * (fan_in + fan_out)
    return total * shape.n_layer


def default_lora_targets(family: str) -> list[str]:
    """LoRA targets used when target_modules is 'auto': every linear layer of the blocks."""
    if family == "gpt2":
        return ["c_attn", "c_proj", "c_fc"]
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def estimate(plan: Plan, *, batch_size: int | None = None, checkpointing: bool | None = None,
             optimizer: str | None = None, method: str | None = None) -> dict[str, float] | None:
    """Per-device peak memory in GiB by component; keyword arguments override the plan (for suggestions)."""
    shape = plan_shape(plan)
    if shape is None:
        return None
    method = method or plan.method.builder
    batch = batch_size or plan.train.batch_size
    ckpt = plan.train.gradient_checkpointing if checkpointing is None else checkpointing
    opt_bytes = BYTES_PER_PARAM_STATE.get(optimizer or plan.train.optimizer, 8.0)
    n = shape.n_params()
    ranks = plan.hardware.num_processes * plan.hardware.num_machines
    dist = plan.hardware.distributed
    shard_params = ranks if dist in ("fsdp", "deepspeed_zero3") else 1
    shard_grads = ranks if dist in ("fsdp", "deepspeed_zero2", "deepspeed_zero3") else 1
    shard_opt = ranks if dist != "none" and dist != "ddp" else 1
    mixed = plan.hardware.mixed_precision != "no"
    half = mixed or plan.model.dtype in ("bfloat16", "float16")

    if method in ("lora", "qlora"):
        lora = plan.method.lora
        targets = lora.target_modules if lora and isinstance(lora.target_modules, list) else \
            default_lora_targets(shape.family)
        trainable = lora_params(shape, targets, lora.r if lora else 16)
        if lora and "lm_head" in lora.modules_to_save:
            trainable += shape.vocab * shape.d
        quant = plan.method.quantization
        bits = (quant.bits if quant else 4) if method == "qlora" else 16
        base_bytes = {4: 0.56, 8: 1.05, 16: 2.0 if half else 4.0}[bits]  # 4-bit: + block scales
        weights = n * base_bytes + trainable * 4
        grads = trainable * 4
        opt = trainable * opt_bytes
    else:
        trainable = n
        # fp32 master weights under mixed precision, plus autocast's 16-bit copy of each weight during the step;
        # without mixed precision the weights (and gradients) live in model.dtype.
        param_bytes = 2.0 if (not mixed and half) else 4.0
        weights = n * param_bytes / shard_params + (n * 2.0 / shard_params if mixed else 0.0)
        grads = n * param_bytes / shard_grads
        if dist == "ddp":
            grads *= 2  # DDP's gradient buckets hold a second copy
        opt = n * opt_bytes / shard_opt

    tokens = batch * plan.seq_len
    act_bytes = 2.0 if half else 4.0
    per_token_layer = (2 * shape.d * act_bytes / 2) if ckpt else (34 * shape.d * act_bytes / 2)
    activations = tokens * shape.n_layer * per_token_layer
    if ckpt:
        activations += tokens * 34 * shape.d * act_bytes / 2  # the one layer being recomputed
    # Logits in the compute dtype, their fp32 copy, the fp32 log-softmax kept for backward, and its gradient. An
    # upper bound: impruver's loss runs the head only on target tokens (the assistant turns of chat SFT).
    logits = tokens * shape.vocab * (act_bytes + 12)
    activations += logits
    parts = {"weights": weights, "gradients": grads, "optimizer": opt, "activations": activations}
    gib = {k: v / GIB for k, v in parts.items()}
    gib["overhead"] = CUDA_OVERHEAD_GIB + (FRAGMENTATION - 1) * sum(gib.values())
    gib["total"] = sum(gib.values())
    return gib


def estimate_memory(plan: Plan) -> Any:
    """The plan's MemoryEstimate (None when the architecture is unknown), with suggestions if it does not fit."""
    from impruver.plan import MemoryEstimate

    gib = estimate(plan)
    if gib is None:
        return None
    budget = plan.hardware.gpu_memory_gib if plan.hardware.device == "cuda" else None
    fits = None if budget is None else gib["total"] <= budget
    suggestions = suggest(plan, budget) if fits is False else []
    return MemoryEstimate(
        weights_gib=round(gib["weights"], 2), gradients_gib=round(gib["gradients"], 2),
        optimizer_gib=round(gib["optimizer"], 2), activations_gib=round(gib["activations"], 2),
        overhead_gib=round(gib["overhead"], 2), total_gib=round(gib["total"], 2),
        budget_gib=budget, fits=fits, suggestions=suggestions,
    )


def suggest(plan: Plan, budget: float) -> list[str]:
    """Settings that would fit ``budget`` GiB, cheapest change first, each with its estimate."""
    out: list[str] = []
    batch, accum = plan.train.batch_size, plan.train.grad_accum
    candidates: list[tuple[str, dict[str, Any]]] = []
    b = batch
    while b > 1:
        b //= 2
        candidates.append((f"train.batch_size={b} train.grad_accum={accum * batch // b}", {"batch_size": b}))
    candidates.append(("train.gradient_checkpointing=true", {"checkpointing": True}))
    candidates.append(("train.gradient_checkpointing=true train.batch_size=1 "
                       f"train.grad_accum={accum * batch}", {"checkpointing": True, "batch_size": 1}))
    if plan.train.optimizer not in ("adamw_8bit", "paged_adamw_8bit"):
        candidates.append(("train.optimizer=paged_adamw_8bit train.gradient_checkpointing=true",
                           {"optimizer": "paged_adamw_8bit", "checkpointing": True}))
    if plan.method.builder != "qlora":
        candidates.append(("method=qlora train.gradient_checkpointing=true train.batch_size=1 "
                           f"train.grad_accum={accum * batch}",
                           {"method": "qlora", "checkpointing": True, "batch_size": 1}))
    for text, kwargs in candidates:
        gib = estimate(plan, **kwargs)
        if gib and gib["total"] <= budget:
            out.append(f"{text}  (~{gib['total']:.1f} GiB)")
        if len(out) == 3:
            break
    return out
