"""Write a float GGUF file (f16 or bf16) from a transformers model folder, one tensor at a time.

The file is laid out in two passes over the safetensors files: the first reads only each tensor's shape and
dtype (``safe_open(...).get_slice``, no data) to write the header, the metadata and the tensor index; the
second loads one tensor, converts it to llama.cpp's layout (asked of the model family) and appends it. Peak host
memory is one tensor (the largest: the embedding or one layer's MLP matrix) plus the vocabulary, whatever the
model's size.

Matrices are written in the chosen float type, 1-D tensors (norms, biases) in f32, as llama.cpp's own
converter does: its kernels read norms in f32, and these tensors are tiny.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from impruver.errors import RunError

log = logging.getLogger("impruver")


@dataclass(frozen=True)
class Source:
    """A model folder to convert: its config.json, weights and family."""

    folder: Path
    config: dict[str, Any]
    family: Any  # impruver.families.ModelFamily with the gguf_* traits
    files: tuple[Path, ...]  # safetensors files

    @property
    def n_vocab(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def weights_dtype(self) -> str:
        """"bf16" when the matrices are stored in bfloat16 (quantize from bf16 then, not f16), else "f16"."""
        from safetensors import safe_open

        with safe_open(self.files[0], framework="pt") as f:
            dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
        return "bf16" if "BF16" in dtypes else "f16"


def source_of(folder: Path) -> Source:
    """The model in ``folder`` and its registered family, checked to be exportable.

    Raises:
        RunError: no config.json or safetensors, or a family that is unregistered or cannot export GGUF.
    """
    from impruver.families import family_named

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise RunError(f"{folder}: no config.json; GGUF export reads a saved transformers model folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    family = family_named(config.get("model_type"))
    if family is None or not getattr(family, "gguf_arch", None):
        from impruver import registry

        able = [n for n in registry.names("families") if getattr(family_named(n), "gguf_arch", None)]
        raise RunError(f"{folder}: model_type '{config.get('model_type')}' has no GGUF traits in its model family; "
                       f"GGUF export knows: {', '.join(able)} (a family adds gguf_arch, gguf_hparams and "
                       "gguf_tensor to export)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        files = tuple(folder / name for name in names)
    else:
        files = tuple(sorted(folder.glob("*.safetensors")))
    if not files:
        raise RunError(f"{folder}: no .safetensors weights (save the model with safe_serialization)")
    return Source(folder, config, family, files)


def write_float_gguf(source: Source, path: Path, *, ftype: str, tokenizer: Any, name: str,
                     chat_template: str | None, eot_id: int | None) -> Path:
    """Write ``source`` as a GGUF file of ``ftype`` ("f16" or "bf16") at ``path`` (atomically: a temporary name,
    then a rename). Returns ``path``."""
    import gguf

    from impruver.gguf.vocab import add_vocab, read_vocab

    family = source.family
    arch = family.gguf_arch
    vocab = read_vocab(source.folder, tokenizer, n_vocab=source.n_vocab, pre_tokenizer=family.gguf_pre_tokenizer)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(getattr(gguf.LlamaFileType, "MOSTLY_BF16" if ftype == "bf16" else "MOSTLY_F16"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in family.gguf_hparams(source.config).items():
        full = f"{arch}.{key}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunError(f"family {family.name}: gguf_hparams gave {full}={value!r}; numbers only")
        (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(full, value)
    add_vocab(writer, vocab)
    if eot_id is not None:
        writer.add_eot_token_id(eot_id)
    if chat_template:
        writer.add_chat_template(chat_template)

    names = _tensor_names(source)
    for gguf_name, tensor in _tensors(source, names, meta=True):
        shape, dtype, raw = _out_layout(tensor, ftype)
        writer.add_tensor_info(gguf_name, shape, dtype, _nbytes(tensor, dtype, raw), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, tensor in _tensors(source, names, meta=False):
        writer.write_tensor_data(_as_numpy(tensor, ftype))
    writer.close()
    tmp.replace(path)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 2**20)
    return path


def _tensor_names(source: Source) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name, through gguf's TensorNameMap for the family's architecture.

    Raises:
        RunError: a weight llama.cpp's architecture has no name for (it would be silently dropped).
    """
    import gguf
    from safetensors import safe_open

    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == source.family.gguf_arch), None)
    if arch is None:
        raise RunError(f"family {source.family.name}: gguf_arch '{source.family.gguf_arch}' is not an "
                       "architecture of the installed gguf package")
    blocks = int(source.family.gguf_hparams(source.config)["block_count"])
    table = gguf.TensorNameMap(arch, blocks)
    mapped: dict[str, str] = {}
    unknown = []
    for file in source.files:
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():
                gguf_name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    unknown.append(hf_name)
                else:
                    mapped[hf_name] = gguf_name
    # A weight the family drops (a buffer) may be unknown to the map; any other unknown weight is an error.
    unknown = [n for n in unknown if source.family.gguf_tensor(n, _meta((1,)), source.config) is not None]
    if unknown:
        raise RunError(f"{source.folder}: llama.cpp's {source.family.gguf_arch} has no tensor for "
                       f"{', '.join(unknown[:5])}")
    return mapped


def _meta(shape: tuple[int, ...]) -> Any:
    import torch

    return torch.empty(shape, device="meta")


def _tensors(source: Source, names: dict[str, str], *, meta: bool) -> Iterator[tuple[str, Any]]:
    """(GGUF name, tensor in llama.cpp's layout) in file order; ``meta``: shape-only tensors, no data read."""
    import torch
    from safetensors import safe_open

    for file in source.files:
        with safe_open(file, framework="pt") as f:
            keys = [k for k in f.keys() if k in names]
        for hf_name in keys:
            # Opened per tensor: safetensors memory-maps the file, and every page read stays in this process's
            # resident set until the map closes (the whole model by the end, with one map).
            with safe_open(file, framework="pt") as f:
                if meta:
                    piece = f.get_slice(hf_name)
                    dtype = torch.bfloat16 if piece.get_dtype() == "BF16" else torch.float32
                    tensor = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
                else:
                    tensor = f.get_tensor(hf_name)
            out = source.family.gguf_tensor(hf_name, tensor, source.config)
            if out is not None:
                yield names[hf_name], out


def _out_layout(tensor: Any, ftype: str) -> tuple[tuple[int, ...], Any, Any]:
    """(shape as GGUFWriter takes it, numpy dtype, raw GGML type or None) of a tensor written as ``ftype``."""
    import gguf
    import numpy as np

    shape = tuple(tensor.shape)
    if tensor.dim() < 2:
        return shape, np.dtype(np.float32), None
    if ftype == "bf16":  # numpy has no bfloat16: raw bytes, 2 per value, typed by raw_dtype
        return (*shape[:-1], shape[-1] * 2), np.dtype(np.uint8), gguf.GGMLQuantizationType.BF16
    return shape, np.dtype(np.float16), None


def _nbytes(tensor: Any, dtype: Any, raw: Any) -> int:
    count = 1
    for n in tensor.shape:
        count *= n
    return count * (2 if raw is not None else dtype.itemsize)


def _as_numpy(tensor: Any, ftype: str) -> Any:
    import torch

    if tensor.dim() < 2:
        return tensor.to(torch.float32).contiguous().numpy()
    if ftype == "bf16":
        return tensor.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    return tensor.to(torch.float16).contiguous().numpy()
