"""A model folder -> ``<dest>/<name>-<type>.gguf`` for each type asked, each with an Ollama ``Modelfile``.

Float types are written directly (:mod:`impruver.gguf.write`); quantized types are made by llama.cpp's quantizer
from a float file of the weights' own precision (bf16 weights: bf16, else f16), written for the purpose and
removed after when it was not asked for itself.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from impruver.errors import RunError
from impruver.gguf import FLOAT_TYPES, gguf_types

if TYPE_CHECKING:
    from impruver.plan import ChatSpec

log = logging.getLogger("impruver")

def export_gguf(folder: Path, dest: Path, kinds: Sequence[str], *, name: str, chat: ChatSpec | None = None,
                tokenizer: Any = None) -> list[dict[str, Any]]:
    """Write ``folder``'s model as GGUF files of ``kinds`` into ``dest``, with a Modelfile each.

    ``tokenizer``: the folder's tokenizer when the caller has it loaded already (else it is loaded from there).

    Returns:
        One record per type: ``{"type", "path", "modelfile", "seconds", "bytes"}``.

    Raises:
        ConfigError: an unknown type. RunError: a model the families cannot export, or a quantizer failure.
    """
    from transformers import AutoTokenizer

    from impruver.data.templates import portable_template
    from impruver.gguf.write import source_of, write_float_gguf

    kinds = gguf_types(kinds)
    source = source_of(folder)
    if any(k not in FLOAT_TYPES for k in kinds):
        from impruver.gguf.quantize import llama_cpp_module

        llama_cpp_module()  # fail before writing anything when the quantizer is missing
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(folder)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    template = portable_template(template) if template else None
    stops = stop_strings(tokenizer)
    eot_id = _single_token(tokenizer, stops[0]) if stops else None
    dest.mkdir(parents=True, exist_ok=True)

    base = source.weights_dtype  # the float file quantized types are made from
    floats = [k for k in kinds if k in FLOAT_TYPES]
    if any(k not in FLOAT_TYPES for k in kinds) and base not in floats:
        floats.append(base)
    written: dict[str, dict[str, Any]] = {}
    for kind in floats:
        started = time.perf_counter()
        path = dest / (f"{name}-{kind}.gguf" if kind in kinds else f".{name}-{kind}.source.gguf")
        write_float_gguf(source, path, ftype=kind, tokenizer=tokenizer, name=name, chat_template=template,
                         eot_id=eot_id)
        written[kind] = {"type": kind, "path": path, "seconds": time.perf_counter() - started}
    try:
        for kind in kinds:
            if kind in FLOAT_TYPES:
                continue
            from impruver.gguf.quantize import quantize

            started = time.perf_counter()
            path = quantize(written[base]["path"], dest / f"{name}-{kind}.gguf", kind)
            written[kind] = {"type": kind, "path": path, "seconds": time.perf_counter() - started}
    finally:
        if base not in kinds and base in written:
            written[base]["path"].unlink(missing_ok=True)
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    out = []
    for kind in kinds:
        record = written[kind]
        record["modelfile"] = write_modelfile(record["path"], template=template, special=special, stops=stops,
                                              chat=chat)
        record["bytes"] = record["path"].stat().st_size
        out.append({**record, "path": str(record["path"]), "modelfile": str(record["modelfile"])})
    return out


def stop_strings(tokenizer: Any) -> list[str]:
    """What ends an assistant turn as Ollama / llama.cpp stop strings: the template's end-of-turn marker (the one
    chat and ``generation_config.json`` stop at, :func:`impruver.chat.generate.end_of_turn`), else the EOS."""
    from impruver.chat.generate import end_of_turn

    marker, _ = end_of_turn(tokenizer)
    eos = tokenizer.eos_token if isinstance(tokenizer.eos_token, str) else None
    return [marker] if marker else ([eos] if eos else [])


def _single_token(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` when it is one token (llama.cpp's end-of-turn id), else None."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def write_modelfile(gguf_path: Path, *, template: str | None, special: dict[str, str], stops: list[str],
                    chat: ChatSpec | None) -> Path:
    """``<file>.Modelfile`` beside ``gguf_path``: ``ollama create NAME -f <it>`` makes an Ollama model of it.

    TEMPLATE is the Ollama form of impruver's registered templates; for any other template Ollama uses the one
    embedded in the GGUF file. PARAMETER stop lines are the end-of-turn strings; sampling comes from ``chat:``.
    """
    from impruver.data.templates import ollama_form
    from impruver.files import atomic_write_text

    lines = [f"# ollama create {gguf_path.stem} -f {gguf_path.stem}.Modelfile && ollama run {gguf_path.stem}",
             f"FROM ./{gguf_path.name}"]
    form = ollama_form(template, special) if template else None
    if form is not None:
        if '"""' in form:
            raise RunError(f'{gguf_path}: the Ollama template holds """, which a Modelfile cannot quote')
        lines.append(f'TEMPLATE """{form}"""')
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    if chat is not None:
        lines += [f"PARAMETER temperature {chat.temperature if chat.do_sample else 0}",
                  f"PARAMETER top_p {chat.top_p}", f"PARAMETER top_k {chat.top_k}",
                  f"PARAMETER repeat_penalty {chat.repetition_penalty}"]
        if chat.system_prompt:
            lines.append(f'SYSTEM """{chat.system_prompt}"""')
    path = gguf_path.with_suffix(".Modelfile")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
