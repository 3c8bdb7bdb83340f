"""GGUF for llama.cpp and Ollama: ``impruver export --gguf f16,q8_0`` (or ``export.gguf: [f16, q8_0]`` in the plan).

A model folder (safetensors + tokenizer) becomes ``<output_dir>/gguf/<name>-<type>.gguf`` plus an Ollama
``Modelfile`` per file. The float files (f16, bf16) are written here with llama.cpp's own ``gguf`` package, one
tensor at a time; the quantized ones by llama.cpp's quantizer (``llama_model_quantize`` through
``llama-cpp-python``) from a float file. What an architecture needs (llama.cpp's name for it, its
hyper-parameters, its tensor layout, the pre-tokenizer of its BPE vocabulary) is asked of its model family
(:mod:`impruver.families`), so a plugin family exports too.

This module imports nothing heavy: the plan validates ``export.gguf`` against :data:`GGUF_TYPES` cheaply.
"""

from __future__ import annotations

from collections.abc import Iterable

from impruver.errors import ConfigError, Problem, choices_hint

# The types ``--gguf`` takes -> the member of llama.cpp's ``llama_ftype`` (gguf.LlamaFileType) that makes them.
GGUF_TYPES: dict[str, str] = {
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q6_k": "MOSTLY_Q6_K",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q4_0": "MOSTLY_Q4_0",
}
FLOAT_TYPES = ("f16", "bf16")  # written by impruver itself; every other type is quantized from one of these


def gguf_types(value: str | Iterable[str], *, key: str = "--gguf") -> tuple[str, ...]:
    """The GGUF types of a comma list (``"f16,q8_0"``) or a list, lower-cased, in order, without repeats.

    Raises:
        ConfigError: one problem per unknown type, each listing the valid ones.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    problems = [Problem(key, f"unknown GGUF type '{name}'; {choices_hint(name, GGUF_TYPES)}")
                for name in names if name not in GGUF_TYPES]
    if not names:
        problems.append(Problem(key, f"name at least one GGUF type: {', '.join(GGUF_TYPES)}"))
    if problems:
        raise ConfigError(problems)
    return tuple(dict.fromkeys(names))


__all__ = ["FLOAT_TYPES", "GGUF_TYPES", "gguf_types"]
