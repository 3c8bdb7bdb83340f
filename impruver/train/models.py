"""Model builders (registry ``models``): ``hf``, ``arch`` and ``custom``.

Each takes the plan's :class:`~impruver.plan.ModelSpec` as ``spec``, the final tokenizer (its size decides the
vocabulary) and how to load it (``load``, decided by the method and the hardware), and returns a
``torch.nn.Module`` causal LM whose forward takes ``input_ids`` and ``position_ids`` (or ``attention_mask``)
and returns an object with ``.logits``. torch and transformers are imported inside the functions only.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from impruver.errors import RunError
from impruver.registry import models

if TYPE_CHECKING:
    from impruver.plan import ArchSpec, ModelSpec, QuantizationSpec

log = logging.getLogger("impruver")

TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class LoadOptions:
    """How to materialise the weights (chosen by the recipe from the method and hardware, not by users)."""

    dtype: str = "float32"  # float32 | bfloat16 | float16: the dtype the parameters live in
    quantization: QuantizationSpec | None = None  # qlora: 4/8-bit base through bitsandbytes
    device: str = "cpu"  # where a quantized model is placed at load time (bitsandbytes loads onto the GPU)


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def attn_implementation(requested: str, *, device: str, dtype: str) -> str:
    """The attention kernel: ``auto`` is flash-attention 2 when installed on a CUDA 16-bit run, else sdpa."""
    if requested != "auto":
        return requested
    if device == "cuda" and dtype in ("bfloat16", "float16") and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def config_from_arch(arch: ArchSpec, *, vocab_size: int, tokenizer: Any = None) -> Any:
    """A transformers config of the ``arch`` family with ``vocab_size`` tokens (the tokenizer's size).

    The family (registry ``families``) builds it; the tokenizer's special-token ids go into it when they fit.
    """
    from impruver.families import require_family

    special = {}
    if tokenizer is not None:
        special = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        special = {k: v for k, v in special.items() if v is not None and v < vocab_size}
    return require_family(arch.family).config_from_arch(arch, vocab_size=vocab_size, special=special)


def _from_config(config: Any, *, load: LoadOptions, attn: str, trust_remote_code: bool = False) -> Any:
    """Random weights of exactly ``config``'s architecture, in ``load.dtype``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(load.dtype), attn_implementation=attn,
                                            trust_remote_code=trust_remote_code)


def resize_to_tokenizer(model: Any, tokenizer: Any) -> bool:
    """Grow the embeddings (mean-initialised) when the tokenizer has tokens the model lacks; True if resized."""
    if tokenizer is None:
        return False
    size = len(tokenizer)
    current = model.get_input_embeddings().weight.shape[0]
    if size <= current:
        return False
    log.info("resizing the embeddings from %d to %d tokens (special tokens were added)", current, size)
    model.resize_token_embeddings(size)
    # Adapter methods train (and save) these rows, which the frozen base does not have.
    model.impruver_new_token_ids = list(range(current, size))
    return True


def _quantization_config(quant: QuantizationSpec) -> Any:
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=_torch_dtype(quant.compute_dtype))


@models("hf")
def hf(*, spec: ModelSpec, tokenizer: Any = None, load: LoadOptions | None = None) -> Any:
    """A causal LM from a Hub id or a local folder through ``AutoModelForCausalLM``.

    ``weights: random`` builds the same architecture with random weights, from ``arch`` or the local
    ``config.json`` (the Hub is not consulted). ``trust_remote_code`` is passed only when the spec sets it.

    Examples:
        model: {builder: hf, path: ai-forever/rugpt3small_based_on_gpt2, dtype: bfloat16}
    """
    from impruver.hub import hub_unreachable, require_reachable

    load = load or LoadOptions()
    attn = attn_implementation(spec.attn_implementation, device=load.device, dtype=load.dtype)
    vocab = len(tokenizer) if tokenizer is not None else None
    if spec.weights == "random":
        if load.quantization is not None:
            log.warning("model.weights=random: the random base is built unquantized (bitsandbytes quantizes only "
                        "weights loaded from a checkpoint); memory use is that of a 16-bit base")
        if spec.arch is not None:
            config = config_from_arch(spec.arch, vocab_size=vocab or spec.arch.vocab_size, tokenizer=tokenizer)
        else:
            config = _local_config(spec, vocab)
        return _from_config(config, load=load, attn=attn, trust_remote_code=spec.trust_remote_code)
    if not spec.path:
        raise RunError("model.path: builder 'hf' loads pretrained weights from a Hub id or a folder; set "
                       "model.path, or model.weights=random with model.arch")
    require_reachable(spec.path, "model", "model.path")
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": _torch_dtype(load.dtype), "attn_implementation": attn,
                              "trust_remote_code": spec.trust_remote_code, "revision": spec.revision}
    if load.quantization is not None:
        kwargs["quantization_config"] = _quantization_config(load.quantization)
        # bitsandbytes places the quantized weights on the GPU as they load: this process's own GPU.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    except OSError as exc:
        if Path(spec.path).exists():
            raise RunError(f"model.path: cannot load a model from '{spec.path}': {exc}") from None
        raise hub_unreachable(spec.path, "model", "model.path", exc) from None
    resize_to_tokenizer(model, tokenizer)
    return model


def _local_config(spec: ModelSpec, vocab: int | None) -> Any:
    from transformers import AutoConfig

    if not spec.path or not Path(spec.path, "config.json").is_file():
        raise RunError("model.arch: random weights need the architecture: give model.arch, or a local "
                       "model.path with a config.json")
    config = AutoConfig.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
    if vocab and vocab > config.vocab_size:
        config.vocab_size = vocab
    return config


@models("arch")
def arch(*, spec: ModelSpec, tokenizer: Any = None, load: LoadOptions | None = None) -> Any:
    """A model of any registered family built from ``model.arch`` (vocabulary = the tokenizer's size).

    Given a ``path`` and ``weights: pretrained`` (fine-tuning what an earlier run trained, such as the demo's
    output folder), the weights are loaded from that folder; ``arch`` then only describes the shape.

    Examples:
        model: {builder: arch, arch: {family: gpt2, n_layer: 2, n_embd: 64, n_head: 4}}
    """
    if spec.path and spec.weights == "pretrained":
        return hf(spec=spec, tokenizer=tokenizer, load=load)
    if spec.arch is None:
        raise RunError("model.arch: builder 'arch' needs the architecture (family, n_layer, n_embd, n_head)")
    load = load or LoadOptions()
    vocab = len(tokenizer) if tokenizer is not None else spec.arch.vocab_size
    config = config_from_arch(spec.arch, vocab_size=vocab, tokenizer=tokenizer)
    attn = attn_implementation(spec.attn_implementation, device=load.device, dtype=load.dtype)
    return _from_config(config, load=load, attn=attn)


def import_class(class_path: str, key: str) -> Any:
    """The class named by 'pkg.module:Class' (or 'pkg.module.Class'); a RunError names ``key`` if it fails."""
    module_name, _, name = class_path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise RunError(f"{key}: cannot import '{class_path}': {exc}") from None


@models("custom")
def custom(*, spec: ModelSpec, tokenizer: Any = None, load: LoadOptions | None = None) -> Any:
    """The user's own model class, named explicitly by ``model.class_path`` ('pkg.module:Class').

    With a ``path`` the class's ``from_pretrained(path)`` loads it (a transformers ``PreTrainedModel``
    subclass); otherwise ``Class(config)`` with the config built from ``arch``, or ``Class()``.

    Examples:
        model: {builder: custom, class_path: my_pkg.models:TinyLM, arch: {family: gpt2, ...}}
    """
    if not spec.class_path:
        raise RunError("model.class_path: builder 'custom' needs the class, e.g. my_pkg.models:MyModel")
    cls = import_class(spec.class_path, "model.class_path")
    load = load or LoadOptions()
    if spec.path and spec.weights == "pretrained":
        if not hasattr(cls, "from_pretrained"):
            raise RunError(f"model.class_path: {spec.class_path} has no from_pretrained to load {spec.path}")
        model = cls.from_pretrained(spec.path, dtype=_torch_dtype(load.dtype),
                                    trust_remote_code=spec.trust_remote_code)
    elif spec.arch is not None:
        vocab = len(tokenizer) if tokenizer is not None else spec.arch.vocab_size
        model = cls(config_from_arch(spec.arch, vocab_size=vocab, tokenizer=tokenizer))
    else:
        model = cls()
    model = model.to(_torch_dtype(load.dtype))
    if hasattr(model, "resize_token_embeddings") and hasattr(model, "get_input_embeddings"):
        resize_to_tokenizer(model, tokenizer)
    return model
