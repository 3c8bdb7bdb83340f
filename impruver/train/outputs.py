"""What a finished run leaves in ``output_dir``: the model (or adapter) as safetensors, the tokenizer with its chat
template, and a model card README saying what was trained on what."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from impruver.components import method_of
from impruver.files import atomic_write_text
from impruver.hub import is_local
from impruver.layout import RunLayout

if TYPE_CHECKING:
    from impruver.plan import Plan

log = logging.getLogger("impruver")


def base_needs_saving(plan: Plan) -> bool:
    """An adapter's base must be saved with it when it was built here (random weights) rather than loaded."""
    return plan.model.weights == "random" or not plan.model.path


def save_base(model: Any, output_dir: str | Path) -> Path:
    """Save the frozen base (before the adapters wrap it) to ``output_dir/base``."""
    folder = RunLayout.of(output_dir).base  # an adapter's base, saved beside it when it exists nowhere else
    model.save_pretrained(folder)
    return folder


def save_model(model: Any, tokenizer: Any, plan: Plan, *, adapter: bool,
               state_dict: dict[str, Any] | None = None) -> None:
    """Write the model (or adapter) and the tokenizer into ``plan.output_dir``.

    ``state_dict``: the full weights gathered from every rank of a sharded run (None: the model's own).

    An adapter's config names its base so that ``peft.AutoPeftModelForCausalLM.from_pretrained(output_dir)``
    loads it: the Hub id, the absolute path of a local base, or the ``base/`` folder saved beside it.
    """
    out = Path(plan.output_dir)
    base_dir = RunLayout.of(out).base
    model.save_pretrained(out, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(out)
    if adapter:
        if base_needs_saving(plan):
            base = str(base_dir.resolve())
        elif plan.model.path and is_local(plan.model.path):
            base = str(Path(plan.model.path).resolve())
        else:
            base = plan.model.path
        config_path = out / "adapter_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = base
        atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True))
        if base_dir.is_dir():
            tokenizer.save_pretrained(base_dir)


def write_card(plan: Plan, summary: dict[str, Any]) -> Path:
    """README.md: the model, the method, the data and the results, and how to load the output."""
    model = plan.model.path or (f"{plan.model.arch.family} {plan.model.arch.n_layer} x {plan.model.arch.n_embd}"
                                if plan.model.arch else plan.model.builder)
    weights = "random weights (trained from scratch)" if plan.model.weights == "random" else "pretrained weights"
    method = describe_method(plan)
    sources = "\n".join(f"  - `{s.path}` (format `{s.format}`"
                        f"{', loss on the whole text' if not s.only_target_loss else ', loss on the assistant turns'})"
                        for s in plan.sources.values())
    t = plan.train
    training = (f"{summary.get('steps')} optimizer steps of {t.batch_size} rows x {summary.get('world_size', 1)} "
                f"processes x {t.grad_accum} accumulation, {plan.seq_len} tokens per row "
                f"({'packed' if t.packing else 'padded'}), lr {t.lr} ({t.scheduler}, {t.warmup_steps} warmup), "
                f"optimizer {t.optimizer}, mixed precision {plan.hardware.mixed_precision}")
    best = f" (best at step {summary['best_step']})" if summary.get("best_step") else ""
    adapter = method_of(plan).adapter
    load = ("from peft import AutoPeftModelForCausalLM\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained({plan.output_dir!r})"
            if adapter else
            "from transformers import AutoModelForCausalLM\n"
            f"model = AutoModelForCausalLM.from_pretrained({plan.output_dir!r})")
    text = f"""---
library_name: {'peft' if adapter else 'transformers'}
tags: [impruver, {plan.method.builder}]
---
# {Path(plan.output_dir).name}

Trained with impruver{f' (preset `{plan.preset}`)' if plan.preset else ''}.

- **Model:** {model}, {weights}
- **Method:** {method}
- **Data:** {summary.get('train_samples', '?')} training and {summary.get('val_samples', 0)} validation samples from
{sources}
- **Training:** {training}
- **Tokens trained on:** {summary.get('tokens', 0):,}
- **Final train loss:** {_fmt(summary.get('train_loss'))}; **eval loss:** {_fmt(summary.get('eval_loss'))}{best}

The full configuration is in `plan.yaml`; per-step metrics in `metrics.jsonl`.

```python
{load}
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained({plan.output_dir!r})
```
"""
    target = RunLayout.of(plan.output_dir).card
    atomic_write_text(target, text)
    return target


def describe_method(plan: Plan) -> str:
    """``lora (r=16, alpha=16, target_modules=auto, ...)``: the method and its options, for people."""
    options = plan.method.model_dump(mode="json", exclude={"builder"})
    flat = _flatten(options)
    return f"{plan.method.builder} ({', '.join(f'{k}={v}' for k, v in flat.items())})" if flat else plan.method.builder


def _flatten(options: dict[str, Any]) -> dict[str, Any]:
    """Nested option groups flattened one level (``lora: {r: 16}`` -> ``r=16``); empty lists left out."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update({k: v for k, v in value.items() if v != []})
        elif value != []:
            flat[key] = value
    return flat


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a"
