"""``impruver export``: merge a trained peft adapter (LoRA, IA3, a plugin method's) into its base and write a standalone model folder.

    impruver export preset=rugpt3large/760M_lora_saiga2                 # -> <output_dir>/merged
    impruver export preset=rugpt3large/760M_lora_saiga2 --dest DIR

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


def run(plan: Plan, *, dest: str | None = None, **_: Any) -> dict[str, Any]:
    """Merge the adapter in ``plan.output_dir`` into its base; write the standalone model to ``dest``.

    Args:
        plan: the plan of the run that trained the adapter (its output_dir holds adapter_config.json).
        dest: the folder to write; default ``<output_dir>/merged``.

    Returns:
        ``{"source": ..., "dest": ..., "parameters": ...}``.

    Raises:
        RunError: no adapter in the output dir (nothing to merge), or its base cannot be loaded.
    """
    source = Path(plan.output_dir)
    if not (source / "adapter_config.json").is_file():
        if (source / "config.json").is_file():
            raise RunError(f"{source} holds a full model, not an adapter: it is already standalone "
                           "(load it with AutoModelForCausalLM); nothing to merge")
        adapters = ", ".join(_adapter_methods())
        raise RunError(f"{source}: no trained adapter here (no adapter_config.json); train first with an adapter "
                       f"method ({adapters}), or point output_dir at the run to export")
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
        peft_model = AutoPeftModelForCausalLM.from_pretrained(source, dtype="auto",
                                                              trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise RunError(f"{source}: cannot load the adapter's base model ({exc}); the base named in "
                       "adapter_config.json (base_model_name_or_path) must be on disk or reachable") from None
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, AutoTokenizer.from_pretrained(source)
