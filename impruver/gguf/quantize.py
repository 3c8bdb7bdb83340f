"""Quantized GGUF files through llama.cpp's own quantizer (``llama_model_quantize``, via ``llama-cpp-python``).

llama.cpp memory-maps the float input and quantizes one tensor at a time into the output, so host memory stays
near one tensor. K-quants (q6_k, q5_k_m, q4_k_m) work on rows in blocks of 256 values: where a matrix's row length
(its input width) is not a multiple of 256, llama.cpp itself picks its fallback type for that tensor (q8_0 /
q5_0 / ...), as ``llama-quantize`` does.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from impruver.errors import RunError
from impruver.gguf import GGUF_TYPES

log = logging.getLogger("impruver")


def llama_cpp_module():  # type: ignore[no-untyped-def]
    """The ``llama_cpp`` binding, or a RunError that says how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise RunError("quantized GGUF types need llama.cpp's quantizer: pip install 'impruver[gguf]' "
                       "(llama-cpp-python; f16 and bf16 need only the gguf package)") from None
    return llama_cpp


def quantize(source: Path, dest: Path, kind: str, *, threads: int | None = None) -> Path:
    """Quantize the float GGUF ``source`` into ``dest`` as ``kind`` (a key of GGUF_TYPES); atomically.

    Raises:
        RunError: the binding is missing or llama.cpp reports a failure.
    """
    import gguf

    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, GGUF_TYPES[kind]))
    params.nthread = threads or os.cpu_count() or 1
    tmp = dest.with_name(f".{dest.name}.tmp")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    if status != 0:
        tmp.unlink(missing_ok=True)
        raise RunError(f"llama.cpp could not quantize {source} to {kind} (status {status}; its log above says why)")
    tmp.replace(dest)
    log.info("wrote %s (%.1f MB)", dest, dest.stat().st_size / 2**20)
    return dest
