"""Peak GPU memory per device, estimated from the plan before anything loads.

The model: weights + gradients + optimizer state (sharded where the distribution strategy says so) + activations of
one micro-batch + logits + a fixed CUDA overhead. Activation bytes per token per layer follow Korthikanti et al.
(2022) with a memory-efficient attention kernel (no seq^2 term): about 34 x hidden bytes in 16-bit precision,
and about 2 x hidden bytes with gradient checkpointing (only the layer inputs are kept, one layer is recomputed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from impruver.families import Shape, family_named, require_family, shape_of

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
LEAN_OPTIMIZER = "paged_adamw_8bit"  # proposed when the optimizer state does not fit


def optimizer_bytes(name: str) -> float:
    """Optimizer state bytes per trainable parameter (a plugin's optimizer: assumed AdamW-like, 8)."""
    return BYTES_PER_PARAM_STATE.get(name, 8.0)


def shape_from_arch(arch: ArchSpec) -> Shape:
    """The shape of ``model.arch`` (its family builds it)."""
    return require_family(arch.family).shape_from_arch(arch)


def shape_from_hf_config(config: dict[str, Any]) -> Shape | None:
    """The shape of a transformers config.json of a registered family, or None."""
    family = family_named(config.get("model_type"))
    return family.shape_from_config(config) if family else None


def plan_shape(plan: Plan) -> Shape | None:
    """The architecture of the plan's model, when it is known without loading anything."""
    return shape_of(plan.model)


def default_lora_targets(family: str) -> list[str]:
    """LoRA targets used when target_modules is 'auto': the family's own default."""
    return list(require_family(family).default_lora_targets)


def _with_method(plan: Plan, name: str) -> Plan:
    """``plan`` trained with method ``name``: its options carried over where they fit (lora -> qlora), else its
    defaults."""
    from impruver.components import method_section

    schema = method_section(name)
    try:
        section = schema.model_validate({**plan.method.model_dump(), "builder": name})
    except ValueError:
        section = schema(builder=name)
    return plan.model_copy(update={"method": section})


def estimate(plan: Plan, *, batch_size: int | None = None, checkpointing: bool | None = None,
             optimizer: str | None = None, method: str | None = None) -> dict[str, float] | None:
    """Per-device peak memory in GiB by component; keyword arguments override the plan (for suggestions)."""
    from impruver.components import method_of
    from impruver.strategies import strategy_of

    shape = plan_shape(plan)
    if shape is None:
        return None
    if method is not None and method != plan.method.builder:
        plan = _with_method(plan, method)
    batch = batch_size or plan.train.batch_size
    ckpt = plan.train.gradient_checkpointing if checkpointing is None else checkpointing
    opt_bytes = optimizer_bytes(optimizer or plan.train.optimizer)
    n = shape.n_params()
    ranks = plan.hardware.num_processes * plan.hardware.num_machines
    strategy = strategy_of(plan)
    shards = strategy.shards
    shard_params = ranks if "params" in shards else 1
    shard_grads = ranks if "grads" in shards else 1
    shard_opt = ranks if "optimizer" in shards else 1
    mixed = plan.hardware.mixed_precision != "no"
    half = mixed or plan.model.dtype in ("bfloat16", "float16")

    own = method_of(plan).memory(shape, plan)
    trainable = own.trainable
    if own.base_bytes_per_param is not None:
        # A frozen base plus fp32 trainable parameters (adapters), their gradients and optimizer state.
        weights = n * own.base_bytes_per_param + trainable * 4
        grads = trainable * 4
        opt = trainable * opt_bytes
    else:
        # fp32 master weights under mixed precision, plus autocast's 16-bit copy of each weight during the step;
        # without mixed precision the weights (and gradients) live in model.dtype.
        param_bytes = 2.0 if (not mixed and half) else 4.0
        weights = trainable * param_bytes / shard_params + (trainable * 2.0 / shard_params if mixed else 0.0)
        grads = trainable * param_bytes / shard_grads
        if ranks > 1 and not shards:
            grads *= 2  # data parallel without sharding (DDP): its gradient buckets hold a second copy
        opt = trainable * opt_bytes / shard_opt

    # The objective's share: a reference model held in memory (a frozen copy for full training; none for an
    # adapter method, whose reference is the model with its adapter disabled, or precomputed log-probs), and the
    # sequences per sample whose activations are kept (a pair: two).
    from impruver.objectives import objective_of

    extra = objective_of(plan).memory(n_params=n, adapter=method_of(plan).adapter,
                                      compute_bytes=2.0 if half else 4.0)
    reference = extra.reference_bytes  # a whole frozen copy on every device (never sharded or wrapped)
    tokens = batch * plan.seq_len * extra.sequences_per_sample
    act_bytes = 2.0 if half else 4.0
    per_token_layer = (2 * shape.d * act_bytes / 2) if ckpt else (34 * shape.d * act_bytes / 2)
    activations = tokens * shape.n_layer * per_token_layer
    if ckpt:
        activations += tokens * 34 * shape.d * act_bytes / 2  # the one layer being recomputed
    # Logits in the compute dtype, their fp32 copy, the fp32 log-softmax kept for backward, and its gradient. An
    # upper bound: impruver's loss runs the head only on target tokens (the assistant turns of chat SFT).
    logits = tokens * shape.vocab * (act_bytes + 12)
    activations += logits
    parts = {"weights": weights, "gradients": grads, "optimizer": opt, "activations": activations,
             "reference": reference}
    gib = {k: v / GIB for k, v in parts.items()}
    gib["overhead"] = CUDA_OVERHEAD_GIB + (FRAGMENTATION - 1) * sum(gib.values())
    gib["total"] = sum(gib.values())
    return gib


def estimate_memory(plan: Plan) -> Any:
    """The plan's MemoryEstimate (None when the architecture is unknown), with suggestions if it does not fit."""
    from impruver.plan import MemoryEstimate

    from impruver.components import method_of

    gib = estimate(plan)
    shape = plan_shape(plan)
    if gib is None or shape is None:
        return None
    trainable = method_of(plan).memory(shape, plan).trainable
    budget = plan.hardware.gpu_memory_gib if plan.hardware.device == "cuda" else None
    fits = None if budget is None else gib["total"] <= budget
    suggestions = suggest(plan, budget) if fits is False else []
    return MemoryEstimate(
        weights_gib=round(gib["weights"], 2), gradients_gib=round(gib["gradients"], 2),
        optimizer_gib=round(gib["optimizer"], 2), activations_gib=round(gib["activations"], 2),
        overhead_gib=round(gib["overhead"], 2), total_gib=round(gib["total"], 2),
        reference_gib=round(gib["reference"], 2),
        budget_gib=budget, fits=fits, suggestions=suggestions, trainable_params=trainable,
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
    if optimizer_bytes(plan.train.optimizer) > optimizer_bytes(LEAN_OPTIMIZER):
        candidates.append((f"train.optimizer={LEAN_OPTIMIZER} train.gradient_checkpointing=true",
                           {"optimizer": LEAN_OPTIMIZER, "checkpointing": True}))
    from impruver.components import method_of

    for lighter in method_of(plan).lighter:  # the methods this one proposes when it does not fit
        candidates.append((f"method={lighter} train.gradient_checkpointing=true train.batch_size=1 "
                           f"train.grad_accum={accum * batch}",
                           {"method": lighter, "checkpointing": True, "batch_size": 1}))
    for text, kwargs in candidates:
        gib = estimate(plan, **kwargs)
        if gib and gib["total"] <= budget:
            out.append(f"{text}  (~{gib['total']:.1f} GiB)")
        if len(out) == 3:
            break
    return out
