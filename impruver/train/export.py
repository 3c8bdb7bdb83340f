"""``impruver export``: merge a trained peft adapter (LoRA, IA3, a plugin method's) into its base and write a standalone model folder.

    impruver export preset=rugpt3large/760M_lora_saiga2                 # -> <output_dir>/merged
    impruver export preset=rugpt3large/760M_lora_saiga2 --dest DIR
    impruver export preset=rugpt3large/760M_lora_saiga2 --gguf f16,q8_0   # + <output_dir>/gguf/ (llama.cpp, Ollama)

The result (safetensors in the base's dtype, tokenizer with its chat template, generation config, ``plan.yaml``
and a model card) loads with ``AutoModelForCausalLM`` alone, without peft, and gives the same logits as the base
with the adapter.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from impruver.errors import RunError
from impruver.layout import RunLayout

if TYPE_CHECKING:
    from impruver.plan import Plan

log = logging.getLogger("impruver")


def run(plan: Plan, *, dest: str | None = None, gguf: str | None = None, **_: Any) -> dict[str, Any]:
    """Merge the adapter in ``plan.output_dir`` into its base; write the standalone model to ``dest``; and, with
    GGUF types (``--gguf f16,q8_0`` or the plan's ``export.gguf``), write ``<output_dir>/gguf/<name>-<type>.gguf``
    and a Modelfile each from the merged model (or from the run's own model when it is not an adapter).

    Args:
        plan: the plan of the run to export (its output_dir holds the model or the adapter).
        dest: the folder the merged model goes to; default ``<output_dir>/merged``.
        gguf: comma list of GGUF types (f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0); default ``export.gguf``.

    Returns:
        ``{"source": ..., "dest": ..., "parameters": ...}`` (a merge) and ``"gguf": [paths]`` (GGUF files).

    Raises:
        RunError: nothing to export in the output dir, or its base cannot be loaded.
        ConfigError: an unknown GGUF type.
    """
    from impruver.gguf import gguf_types

    kinds = gguf_types(gguf) if gguf is not None else tuple(plan.export.gguf)
    source = Path(plan.output_dir)
    adapter = (source / "adapter_config.json").is_file()
    if not adapter and not (kinds and (source / "config.json").is_file()):
        if (source / "config.json").is_file():
            raise RunError(f"{source} holds a full model, not an adapter: it is already standalone "
                           "(load it with AutoModelForCausalLM); nothing to merge (--gguf TYPES converts it)")
        adapters = ", ".join(_adapter_methods())
        raise RunError(f"{source}: no trained adapter here (no adapter_config.json); train first with an adapter "
                       f"method ({adapters}), or point output_dir at the run to export")
    result: dict[str, Any] = {"source": str(source)}
    model_dir = source
    if adapter:
        result = merge(plan, source, dest)
        model_dir = Path(result["dest"])
    if kinds:
        from impruver.gguf.export import export_gguf

        files = export_gguf(model_dir, RunLayout.of(source).gguf, kinds, name=source.resolve().name, chat=plan.chat)
        result["gguf"] = [f["path"] for f in files]
    return result


def merge(plan: Plan, source: Path, dest: str | None) -> dict[str, Any]:
    """The adapter in ``source`` merged into its base (in the base's dtype), written to ``dest`` or merged/."""
    target = Path(dest) if dest else RunLayout.of(source).merged
    if target.resolve() == source.resolve():
        raise RunError("--dest: choose a folder other than the adapter's own output_dir")
    model, tokenizer = load_merged(source, trust_remote_code=plan.model.trust_remote_code)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_standalone(tmp, model=model, tokenizer=tokenizer, plan=plan, derived_from=str(source))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    parameters = sum(p.numel() for p in model.parameters())
    log.info("merged %s into its base: %s parameters written to %s", source, f"{parameters:,}", target)
    return {"source": str(source), "dest": str(target), "parameters": parameters}


def write_standalone(folder: Path, *, model: Any, tokenizer: Any, plan: Plan, derived_from: str) -> None:
    """A standalone model folder ready to serve: weights, tokenizer, template, generation config, plan and card."""
    from impruver.train.outputs import carry_record, restore_use_cache, write_serving_files

    restore_use_cache(model)
    model.save_pretrained(folder)
    write_serving_files(folder, model=model, tokenizer=tokenizer, plan=plan)
    carry_record(plan, folder, derived_from=derived_from)


def _adapter_methods() -> list[str]:
    """method=NAME choices that train an adapter (asked of each registered method component)."""
    from impruver import registry
    from impruver.components import method_named

    found = []
    for name in registry.names("methods"):
        try:
            if method_named(name).adapter:
                found.append(f"method={name}")
        except Exception:  # a plugin that fails to load is not a choice
            continue
    return found


def load_merged(source: Path, *, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The base with ``source``'s adapter merged in (a plain transformers model), and the tokenizer."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    try:
        # dtype="auto": the base loads in the dtype its config.json names (bf16 stays bf16, not fp32), and peft
        # merges the adapter's delta into it in that dtype.
        peft_model = AutoPeftModelForCausalLM.from_pretrained(source, dtype="auto",
                                                              trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise RunError(f"{source}: cannot load the adapter's base model ({exc}); the base named in "
                       "adapter_config.json (base_model_name_or_path) must be on disk or reachable") from None
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, AutoTokenizer.from_pretrained(source)
