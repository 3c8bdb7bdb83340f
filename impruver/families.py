"""Model families (registry ``families``): the ONE home of what impruver knows about an architecture.

A family answers for itself: its module names (to check LoRA targets before anything loads), its default LoRA
targets and the extra peft settings its layers need, whether the output head can run on the target rows only
(see :mod:`impruver.train.loss`), the transformers config it builds from ``model.arch``, and its parameter shapes
(for the memory plan). ``model.arch.family`` names one; a plugin adds one through the entry-point group
``impruver_families`` and gets exactly what a built-in gets.

Nothing here imports torch or transformers at module level: planning stays a cheap dry run.

CONTRACT (used by plan, memory, train/models, train/methods, train/loss):

    family = family_named("llama")                     # None when no family of that name is registered
    family.linear_modules: frozenset[str]              # names of the model's linear / embedding modules
    family.default_lora_targets: tuple[str, ...]       # target_modules: auto
    family.lora_config_extra: dict[str, Any]           # e.g. gpt2: {"fan_in_fan_out": True} (Conv1D layers)
    family.head_on_targets: bool
    family.config_from_arch(arch, *, vocab_size, special) -> transformers.PretrainedConfig
    family.shape_from_arch(arch) -> Shape
    family.shape_from_config(config_json_dict) -> Shape
    family.linears(shape) -> list[(module name, in features, out features)]   # one layer
    family.n_params(shape) -> int

GGUF (optional: a family without ``gguf_arch`` cannot be exported for llama.cpp; used by :mod:`impruver.gguf`):

    family.gguf_arch: str                              # llama.cpp's architecture name ("gpt2", "llama", ...)
    family.gguf_pre_tokenizer: str                     # tokenizer.ggml.pre of a byte-level BPE vocabulary
    family.gguf_hparams(config_json_dict) -> dict[str, int | float]   # "{arch}.<key>" suffix -> value (block_count...)
    family.gguf_tensor(name, tensor, config_json_dict) -> tensor | None # llama.cpp's layout; None: not a weight
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from impruver import registry
from impruver.registry import families

if TYPE_CHECKING:
    from impruver.plan import ArchSpec, ModelSpec


@dataclass(frozen=True)
class Shape:
    """The numbers of an architecture that memory depends on (``family`` names its ModelFamily)."""

    family: str
    n_layer: int
    d: int  # hidden width
    n_head: int
    n_kv_head: int
    ff: int  # MLP width
    vocab: int
    positions: int  # context length
    tied: bool  # input embedding and output head share one matrix
    head_size: int | None = None  # per-head width when the config sets it apart from d / n_head (Qwen3: 128)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d // self.n_head

    @property
    def component(self) -> ModelFamily:
        return require_family(self.family)

    def linears(self) -> list[tuple[str, int, int]]:
        """(module name, in features, out features) of each linear module of one layer."""
        return self.component.linears(self)

    def n_params(self) -> int:
        """Exactly what transformers builds for this shape (checked against the real modules in the tests)."""
        return self.component.n_params(self)

    def n_params_non_embedding(self) -> int:
        """Parameters that take part in the 6N FLOPs per token (position embeddings excluded)."""
        return self.n_params() - self.component.position_params(self)


@runtime_checkable
class ModelFamily(Protocol):
    """What the core asks a model family (see the module docstring)."""

    name: str
    linear_modules: frozenset[str]
    default_lora_targets: tuple[str, ...]
    lora_config_extra: dict[str, Any]
    head_on_targets: bool

    def config_from_arch(self, arch: ArchSpec, *, vocab_size: int, special: dict[str, int]) -> Any: ...
    def shape_from_arch(self, arch: ArchSpec) -> Shape: ...
    def shape_from_config(self, config: dict[str, Any]) -> Shape: ...
    def linears(self, shape: Shape) -> list[tuple[str, int, int]]: ...
    def n_params(self, shape: Shape) -> int: ...
    def position_params(self, shape: Shape) -> int: ...


# -- lookups ---------------------------------------------------------------------------------------------------


def family_named(name: str | None) -> ModelFamily | None:
    """The registered family ``name`` (built-in or a plugin's), or None."""
    if not name or not registry.has("families", name):
        return None
    return registry.lookup("families", name)  # type: ignore[no-any-return]


def require_family(name: str) -> ModelFamily:
    """The registered family ``name``; a RegistryError lists the registered ones."""
    return registry.lookup("families", name)  # type: ignore[no-any-return]


def local_config(path: str | None) -> dict[str, Any] | None:
    """The config.json of a local model folder, or None (no Hub lookups before anything loads)."""
    if path and Path(path, "config.json").is_file():
        try:
            data = json.loads(Path(path, "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None
    return None


def family_name_of(model: ModelSpec) -> str | None:
    """The family named by ``model.arch``, else the ``model_type`` of a local ``config.json`` (registered or not)."""
    if model.arch is not None:
        return model.arch.family
    config = local_config(model.path)
    return config.get("model_type") if config else None


def family_of(model: ModelSpec) -> ModelFamily | None:
    """The plan model's registered family, when it is known without loading anything."""
    return family_named(family_name_of(model))


def family_of_module(model: Any) -> ModelFamily | None:
    """The registered family of a loaded transformers model (its ``config.model_type``), or None."""
    return family_named(getattr(getattr(model, "config", None), "model_type", None))


def shape_of(model: ModelSpec) -> Shape | None:
    """The plan model's shape, from ``arch`` or a local config.json of a registered family; else None."""
    if model.arch is not None:
        family = family_named(model.arch.family)
        return family.shape_from_arch(model.arch) if family else None
    config = local_config(model.path)
    family = family_named(config.get("model_type")) if config else None
    if family is None or config is None:
        return None
    try:
        return family.shape_from_config(config)
    except (KeyError, TypeError, ValueError):
        return None


# -- the built-in families -------------------------------------------------------------------------------------


class GPT2:
    """GPT-2 (and ruGPT-3): Conv1D layers with biases (weights stored transposed), learned position embeddings."""

    name = "gpt2"
    linear_modules = frozenset({"c_attn", "c_proj", "c_fc", "lm_head", "wte", "wpe"})
    default_lora_targets = ("c_attn", "c_proj", "c_fc")
    lora_config_extra = {"fan_in_fan_out": True}  # Conv1D stores (in, out), peft's default expects (out, in)
    head_on_targets = True

    def config_from_arch(self, arch: ArchSpec, *, vocab_size: int, special: dict[str, int]) -> Any:
        from transformers import AutoConfig

        return AutoConfig.for_model(
            "gpt2", n_layer=arch.n_layer, n_embd=arch.n_embd, n_head=arch.n_head, n_inner=arch.n_inner,
            n_positions=arch.n_positions, n_ctx=arch.n_positions, vocab_size=vocab_size, resid_pdrop=arch.dropout,
            embd_pdrop=arch.dropout, attn_pdrop=arch.dropout, tie_word_embeddings=arch.tie_word_embeddings,
            **special,
        )

    def shape_from_arch(self, arch: ArchSpec) -> Shape:
        ff = arch.n_inner or 4 * arch.n_embd
        return Shape(self.name, arch.n_layer, arch.n_embd, arch.n_head, arch.n_head, ff, arch.vocab_size,
                     arch.n_positions, arch.tie_word_embeddings)

    def shape_from_config(self, config: dict[str, Any]) -> Shape:
        d = config["n_embd"]
        return Shape(self.name, config["n_layer"], d, config["n_head"], config["n_head"],
                     config.get("n_inner") or 4 * d, config["vocab_size"], config.get("n_positions", 1024),
                     bool(config.get("tie_word_embeddings", True)))

    def linears(self, shape: Shape) -> list[tuple[str, int, int]]:
        d, ff = shape.d, shape.ff
        # c_proj appears twice: the attention output (d -> d) and the MLP output (ff -> d).
        return [("c_attn", d, 3 * d), ("c_proj", d, d), ("c_fc", d, ff), ("c_proj", ff, d)]

    def n_params(self, shape: Shape) -> int:
        # Conv1D layers with biases; two LayerNorms (weight + bias) per block, one at the end.
        per_layer = sum(i * o + o for _, i, o in self.linears(shape)) + 4 * shape.d
        embed = shape.vocab * shape.d + shape.positions * shape.d
        head = 0 if shape.tied else shape.vocab * shape.d
        return shape.n_layer * per_layer + embed + head + 2 * shape.d

    def position_params(self, shape: Shape) -> int:
        return shape.positions * shape.d

    # -- GGUF (llama.cpp) --------------------------------------------------------------------------------------
    gguf_arch = "gpt2"
    # ruGPT-3 and impruver's own BPE split text with GPT-2's byte-level regex (tokenizers' ByteLevel pre-tokenizer),
    # whatever hash a newly trained vocabulary gets: llama.cpp's "gpt-2" pre-tokenizer is that regex.
    gguf_pre_tokenizer = "gpt-2"

    def gguf_hparams(self, config: dict[str, Any]) -> dict[str, int | float]:
        d = config["n_embd"]
        return {"context_length": config.get("n_ctx") or config.get("n_positions", 1024), "embedding_length": d,
                "block_count": config["n_layer"], "feed_forward_length": config.get("n_inner") or 4 * d,
                "attention.head_count": config["n_head"],
                "attention.layer_norm_epsilon": config.get("layer_norm_epsilon", 1e-5)}

    def gguf_tensor(self, name: str, tensor: Any, config: dict[str, Any]) -> Any:
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return None  # old transformers saved the causal mask as a buffer: not a weight
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            return tensor.t()  # Conv1D stores (in, out); ggml's matmul reads (out, in) rows like nn.Linear
        return tensor


def llama_ff(d: int) -> int:
    """Llama's default MLP width: 8/3 of the hidden width rounded up to a multiple of 256."""
    return 256 * ((int(8 * d / 3) + 255) // 256)


class Llama:
    """Llama: bias-free linear layers, grouped-query attention, a gated MLP, RMSNorm, rotary positions."""

    name = "llama"
    linear_modules = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                "lm_head", "embed_tokens"})
    default_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_config_extra: dict[str, Any] = {}
    head_on_targets = True

    def arch_extra(self, arch: ArchSpec) -> dict[str, Any]:
        """Config keys this member of the family adds (Mistral's sliding window, ...)."""
        return {}

    def config_from_arch(self, arch: ArchSpec, *, vocab_size: int, special: dict[str, int]) -> Any:
        from transformers import AutoConfig

        return AutoConfig.for_model(
            self.name, hidden_size=arch.n_embd, num_hidden_layers=arch.n_layer, num_attention_heads=arch.n_head,
            num_key_value_heads=arch.n_kv_head or arch.n_head, intermediate_size=arch.n_inner or llama_ff(arch.n_embd),
            max_position_embeddings=arch.n_positions, vocab_size=vocab_size, attention_dropout=arch.dropout,
            tie_word_embeddings=arch.tie_word_embeddings, rope_theta=arch.rope_theta, **self.arch_extra(arch),
            **special,
        )

    def shape_from_arch(self, arch: ArchSpec) -> Shape:
        return Shape(self.name, arch.n_layer, arch.n_embd, arch.n_head, arch.n_kv_head or arch.n_head,
                     arch.n_inner or llama_ff(arch.n_embd), arch.vocab_size, arch.n_positions,
                     arch.tie_word_embeddings)

    def shape_from_config(self, config: dict[str, Any]) -> Shape:
        return Shape(self.name, config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
                     config.get("num_key_value_heads") or config["num_attention_heads"],
                     config["intermediate_size"], config["vocab_size"],
                     config.get("max_position_embeddings", 2048), bool(config.get("tie_word_embeddings", False)),
                     config.get("head_dim"))

    def linears(self, shape: Shape) -> list[tuple[str, int, int]]:
        # Queries and outputs span n_head x head_dim (= d unless the config sets head_dim apart, as Qwen3 does).
        d, ff, q, kv = shape.d, shape.ff, shape.n_head * shape.head_dim, shape.n_kv_head * shape.head_dim
        return [("q_proj", d, q), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", q, d),
                ("gate_proj", d, ff), ("up_proj", d, ff), ("down_proj", ff, d)]

    def layer_extra(self, shape: Shape) -> int:
        """Parameters a family member adds per layer beyond Llama's (biases, extra norms)."""
        return 0

    def n_params(self, shape: Shape) -> int:
        # No biases; two RMSNorm weights per layer, one at the end.
        per_layer = sum(i * o for _, i, o in self.linears(shape)) + 2 * shape.d + self.layer_extra(shape)
        head = 0 if shape.tied else shape.vocab * shape.d
        return shape.n_layer * per_layer + shape.vocab * shape.d + head + shape.d

    def position_params(self, shape: Shape) -> int:
        return 0  # rotary positions have no weights

    # -- GGUF (llama.cpp) --------------------------------------------------------------------------------------
    gguf_arch = "llama"
    gguf_pre_tokenizer = "llama-bpe"  # a byte-level BPE Llama (Llama 3); SentencePiece vocabularies need none
    # llama.cpp's "llama" rope rotates adjacent pairs (x[2i], x[2i+1]); transformers rotates halves
    # (x[i], x[i + head_dim/2]). The q and k rows are reordered so both compute the same attention.
    gguf_rope_pairs = True

    def gguf_hparams(self, config: dict[str, Any]) -> dict[str, int | float]:
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return {"context_length": config.get("max_position_embeddings", 2048),
                "embedding_length": config["hidden_size"], "block_count": config["num_hidden_layers"],
                "feed_forward_length": config["intermediate_size"], "attention.head_count": heads,
                "attention.head_count_kv": config.get("num_key_value_heads") or heads,
                "attention.layer_norm_rms_epsilon": config.get("rms_norm_eps", 1e-6),
                "rope.freq_base": _rope_theta(config), "rope.dimension_count": head_dim,
                "attention.key_length": head_dim, "attention.value_length": head_dim}

    def gguf_tensor(self, name: str, tensor: Any, config: dict[str, Any]) -> Any:
        if self.gguf_rope_pairs and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            heads = config["num_attention_heads"]
            if ".k_proj." in name:  # keys have the grouped-query head count
                heads = config.get("num_key_value_heads") or heads
            return _halves_to_pairs(tensor, heads)
        return tensor


class Mistral(Llama):
    """Mistral: Llama's layers with sliding-window attention."""

    name = "mistral"
    gguf_pre_tokenizer = "tekken"  # a byte-level BPE Mistral (Tekken); v1-v3 SentencePiece vocabularies need none

    def arch_extra(self, arch: ArchSpec) -> dict[str, Any]:
        return {"sliding_window": arch.sliding_window}


class Qwen2(Llama):
    """Qwen2: Llama's layers with biases on q, k and v; optional sliding window."""

    name = "qwen2"
    gguf_arch = "qwen2"
    gguf_pre_tokenizer = "qwen2"
    gguf_rope_pairs = False  # llama.cpp's qwen2 rope rotates halves, as transformers does

    def arch_extra(self, arch: ArchSpec) -> dict[str, Any]:
        return {"sliding_window": arch.sliding_window} if arch.sliding_window else {}

    def layer_extra(self, shape: Shape) -> int:
        return shape.d + 2 * shape.n_kv_head * shape.head_dim  # q, k, v biases


class Qwen3(Qwen2):
    """Qwen3: Llama's layers with RMSNorm on queries and keys (per head), no q/k/v biases."""

    name = "qwen3"
    gguf_arch = "qwen3"

    def arch_extra(self, arch: ArchSpec) -> dict[str, Any]:
        # transformers' Qwen3 default head_dim is 128 whatever the width; `arch` means d / n_head per head.
        return {**super().arch_extra(arch), "head_dim": arch.n_embd // arch.n_head}

    def layer_extra(self, shape: Shape) -> int:
        return 2 * shape.head_dim  # q_norm and k_norm


def _rope_theta(config: dict[str, Any]) -> float:
    """The rope base, from ``rope_theta`` or transformers 5's ``rope_parameters``."""
    params = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _halves_to_pairs(tensor: Any, heads: int) -> Any:
    """Reorder each head's rows (out, ...) from rotate-half order to adjacent pairs: row i of the first half and
    row i of the second half become rows 2i and 2i+1 (the inverse of what HF's Llama conversion did)."""
    shape = tensor.shape
    return tensor.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


for _family in (GPT2(), Llama(), Mistral(), Qwen2(), Qwen3()):
    families(_family.name)(_family)


__all__ = ["ModelFamily", "Shape", "family_name_of", "family_named", "family_of", "family_of_module",
           "local_config", "require_family", "shape_of"]
