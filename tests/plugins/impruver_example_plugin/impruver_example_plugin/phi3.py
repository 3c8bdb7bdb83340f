"""A model family impruver does not ship: Phi-3 (transformers' ``phi3``).

Registered through the entry-point group ``impruver_families``, it gets what a built-in family gets:
``model.arch.family=phi3`` builds and trains from scratch, LoRA targets are checked and defaulted, the output
head runs on target rows only, and the memory plan counts its parameters exactly.
"""

from __future__ import annotations

from typing import Any

from impruver.families import Shape, llama_ff


class Phi3:
    """Phi-3: fused q/k/v and gate/up projections, no biases, RMSNorm, rotary positions."""

    name = "phi3"
    linear_modules = frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head", "embed_tokens"})
    default_lora_targets = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    lora_config_extra: dict[str, Any] = {}
    head_on_targets = True

    def config_from_arch(self, arch: Any, *, vocab_size: int, special: dict[str, int]) -> Any:
        from transformers import AutoConfig

        # Phi-3's own special-token ids (32000...) lie outside a small vocabulary: only the tokenizer's are kept.
        ids = {key: special.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return AutoConfig.for_model(
            "phi3", hidden_size=arch.n_embd, num_hidden_layers=arch.n_layer, num_attention_heads=arch.n_head,
            num_key_value_heads=arch.n_kv_head or arch.n_head, intermediate_size=arch.n_inner or llama_ff(arch.n_embd),
            max_position_embeddings=arch.n_positions, original_max_position_embeddings=arch.n_positions,
            vocab_size=vocab_size, attention_dropout=arch.dropout, resid_pdrop=arch.dropout, embd_pdrop=arch.dropout,
            tie_word_embeddings=arch.tie_word_embeddings, rope_theta=arch.rope_theta,
            sliding_window=arch.sliding_window, **ids,
        )

    def shape_from_arch(self, arch: Any) -> Shape:
        return Shape(self.name, arch.n_layer, arch.n_embd, arch.n_head, arch.n_kv_head or arch.n_head,
                     arch.n_inner or llama_ff(arch.n_embd), arch.vocab_size, arch.n_positions,
                     arch.tie_word_embeddings)

    def shape_from_config(self, config: dict[str, Any]) -> Shape:
        return Shape(self.name, config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
                     config.get("num_key_value_heads") or config["num_attention_heads"], config["intermediate_size"],
                     config["vocab_size"], config.get("max_position_embeddings", 4096),
                     bool(config.get("tie_word_embeddings", False)))

    def linears(self, shape: Shape) -> list[tuple[str, int, int]]:
        d, ff, kv = shape.d, shape.ff, shape.n_kv_head * shape.head_dim
        return [("qkv_proj", d, d + 2 * kv), ("o_proj", d, d), ("gate_up_proj", d, 2 * ff), ("down_proj", ff, d)]

    def n_params(self, shape: Shape) -> int:
        per_layer = sum(i * o for _, i, o in self.linears(shape)) + 2 * shape.d  # no biases; two RMSNorms
        head = 0 if shape.tied else shape.vocab * shape.d
        return shape.n_layer * per_layer + shape.vocab * shape.d + head + shape.d

    def position_params(self, shape: Shape) -> int:
        return 0  # rotary positions have no weights


phi3 = Phi3()
