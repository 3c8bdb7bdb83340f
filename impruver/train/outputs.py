"""What a finished run (and every export) leaves: a folder every serving stack takes as it is.

* the model (or adapter) as safetensors, ``use_cache`` back on (training turns it off for packed rows);
* the tokenizer under a class every transformers since 4.57 loads, and a ``chat_template.jinja`` without the
  training-only ``{% generation %}`` tags, in a form plain Jinja2 / minijinja render exactly as transformers does;
* ``generation_config.json`` with every id that ends an assistant turn (EOS and the template's end-of-turn
  token, found by rendering the template) and the ``chat`` section's sampling defaults, so ``model.generate``,
  ``vllm serve`` and ``impruver chat`` stop and sample alike;
* a model card (``README.md``) written through huggingface_hub's card API, with the base, the datasets, the plan
  and the final metrics; and ``plan.yaml``.

An adapter names its base portably: the Hub id when the base came from the Hub (directly or as a Hub-cache
snapshot); otherwise the absolute path of the local base (a local base exists only on this machine: moved
elsewhere, set ``base_model_name_or_path`` in ``adapter_config.json``, or export a merged model).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from impruver.components import method_of
from impruver.data.templates import portable_template
from impruver.files import atomic_write_text
from impruver.hub import hub_id_of
from impruver.layout import RunLayout

if TYPE_CHECKING:
    from impruver.plan import Plan

log = logging.getLogger("impruver")

CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"


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
    """Write the model (or adapter), the tokenizer and the generation settings into ``plan.output_dir``.

    ``state_dict``: the full weights gathered from every rank of a sharded run (None: the model's own).

    An adapter's config names its base (see :func:`base_reference`) so that
    ``peft.AutoPeftModelForCausalLM.from_pretrained(output_dir)`` loads it.
    """
    out = Path(plan.output_dir)
    base_dir = RunLayout.of(out).base
    restore_use_cache(model)
    model.save_pretrained(out, **({"state_dict": state_dict} if state_dict is not None else {}))
    write_serving_files(out, model=model, tokenizer=tokenizer, plan=plan)
    if adapter:
        config_path = out / "adapter_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = base_reference(plan)
        atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True))
        if base_dir.is_dir():
            restore_use_cache_file(base_dir)
            write_serving_files(base_dir, model=model, tokenizer=tokenizer, plan=plan)


def base_reference(plan: Plan) -> str:
    """How an adapter names its base: the Hub id when it came from the Hub, else an absolute local path.

    A random-weight base is saved beside the adapter (``base/``) and named by that folder's absolute path: peft
    resolves a relative name against the working directory, not the adapter's folder.
    """
    if base_needs_saving(plan) or not plan.model.path:
        return str(RunLayout.of(plan.output_dir).base.resolve())
    return hub_id_of(plan.model.path) or str(Path(plan.model.path).expanduser().resolve())


def restore_use_cache(model: Any) -> None:
    """Training turns the KV cache off (it would switch off packed-sequence masking); generation wants it on."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = True


def restore_use_cache_file(folder: Path) -> None:
    """``use_cache: true`` in a saved ``config.json`` (an adapter's base saved while training)."""
    path = folder / "config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        if config.get("use_cache") is False:
            config["use_cache"] = True
            atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_serving_files(folder: Path, *, model: Any, tokenizer: Any, plan: Plan) -> None:
    """The tokenizer (portable class), the template as every Jinja reads it, and ``generation_config.json``."""
    from impruver.data.tokenizers import save_tokenizer

    save_tokenizer(tokenizer, folder)
    if getattr(tokenizer, "chat_template", None):
        atomic_write_text(folder / CHAT_TEMPLATE_FILE, portable_template(tokenizer.chat_template))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        if isinstance(config.get("chat_template"), str):  # an older layout keeps the template here too
            config["chat_template"] = portable_template(config["chat_template"])
            atomic_write_text(config_path, json.dumps(config, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    write_generation_config(folder, model=model, tokenizer=tokenizer, plan=plan)


def write_generation_config(folder: Path, *, model: Any, tokenizer: Any, plan: Plan) -> Path:
    """``generation_config.json``: the ids that end a reply, and ``chat``'s sampling settings as defaults.

    The stop ids are those ``impruver chat`` stops at (:func:`impruver.chat.generate.eos_ids`: the EOS, the
    token the template ends an assistant turn with, found by rendering it). A marker of several tokens cannot be
    a stop id; ``impruver chat`` stops at it as a string, other stacks take it as a stop string (vLLM's ``stop``).
    """
    from transformers import GenerationConfig

    from impruver.chat.generate import eos_ids

    chat = plan.chat
    stops = eos_ids(model, tokenizer)
    sampling = ({"temperature": chat.temperature, "top_p": chat.top_p, "top_k": chat.top_k} if chat.do_sample else {})
    config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stops if len(stops) > 1 else (stops[0] if stops else None),
        do_sample=chat.do_sample, max_new_tokens=chat.max_new_tokens, repetition_penalty=chat.repetition_penalty,
        **sampling)
    config.save_pretrained(folder)
    return folder / GENERATION_CONFIG_FILE


def run_summary(output_dir: str | Path) -> dict[str, Any]:
    """What the run that trained ``output_dir`` recorded at its end (``run.json``); {} before one has ended."""
    path = RunLayout.of(output_dir).run_record
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def record_check(plan: Plan, checked: dict[str, Any]) -> dict[str, Any]:
    """The check the main job ends with (``eval.questions``), added to ``run.json`` and the model card: training
    wrote both before the check ran. Returns the updated record."""
    from impruver.train.recipe import note_resumes

    layout = RunLayout.of(plan.output_dir)
    record = {**run_summary(plan.output_dir), "eval_accuracy": checked["accuracy"], "eval_questions": checked["n"],
              "eval_source": checked.get("questions")}
    atomic_write_text(layout.run_record, json.dumps(record, indent=1))
    write_card(plan, record)
    if record.get("resumes"):
        note_resumes(layout.card, record["resumes"])
    return record


def carry_record(plan: Plan, folder: str | Path, *, summary: dict[str, Any] | None = None,
                 derived_from: str | None = None) -> None:
    """An export's ``plan.yaml`` and model card (a standalone model: transformers loads it without peft)."""
    plan.write(folder)
    write_card(plan, summary if summary is not None else run_summary(plan.output_dir), folder=folder,
               adapter=False, derived_from=derived_from)


def write_card(plan: Plan, summary: dict[str, Any], *, folder: str | Path | None = None, adapter: bool | None = None,
               derived_from: str | None = None) -> Path:
    """README.md through huggingface_hub's card API: metadata the Hub reads, then the model, the method, the
    data, the results, how to load it and the plan (secrets redacted).

    Args:
        plan: the run's plan.
        summary: the run's summary (steps, losses, tokens ...).
        folder: where to write (default: the output dir).
        adapter: the folder holds an adapter (default: the plan's method trains one).
        derived_from: for an export, the folder it was made from (said in the card).
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder) if folder is not None else Path(plan.output_dir)
    adapter = method_of(plan).adapter if adapter is None else adapter
    base_id = hub_id_of(plan.model.path) if plan.model.path and plan.model.weights != "random" else None
    datasets = sorted({hub for s in plan.sources.values() if (hub := hub_id_of(s.path))})
    data = ModelCardData(
        base_model=base_id, datasets=datasets or None, language=list(plan.model.language) or None,
        license=plan.model.license, library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation", tags=["impruver", plan.method.builder, "text-generation"],
        model_name=folder.name)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{_card_body(plan, summary, folder, adapter, derived_from)}")
    target = folder / RunLayout.of(folder).card.name
    atomic_write_text(target, str(card))
    return target


def _check_line(summary: dict[str, Any]) -> str:
    """The card's line for the check the main job ends with, when it ran."""
    if summary.get("eval_accuracy") is None:
        return ""
    n, accuracy = summary.get("eval_questions") or 0, summary["eval_accuracy"]
    source = f" of `{summary['eval_source']}`" if summary.get("eval_source") else ""
    return (f"\n- **Check:** {round(accuracy * n)}/{n} held-out questions{source} answered exactly "
            f"({100 * accuracy:.1f}%, greedy)")


def _card_body(plan: Plan, summary: dict[str, Any], folder: Path, adapter: bool, derived_from: str | None) -> str:
    model = plan.model.path or (f"{plan.model.arch.family} {plan.model.arch.n_layer} x {plan.model.arch.n_embd}"
                                if plan.model.arch else plan.model.builder)
    weights = "random weights (trained from scratch)" if plan.model.weights == "random" else "pretrained weights"
    sources = "\n".join(f"  - `{s.path}` (format `{s.format}`"
                        f"{', loss on the whole text' if not s.only_target_loss else ', loss on the assistant turns'})"
                        for s in plan.sources.values())
    t = plan.train
    training = (f"{summary.get('steps')} optimizer steps of {t.batch_size} rows x {summary.get('world_size', 1)} "
                f"processes x {t.grad_accum} accumulation, {plan.seq_len} tokens per row "
                f"({'packed' if t.packing else 'padded'}), lr {t.lr} ({t.scheduler}, {t.warmup_steps} warmup), "
                f"optimizer {t.optimizer}, mixed precision {plan.hardware.mixed_precision}")
    best = f" (best at step {summary['best_step']})" if summary.get("best_step") else ""
    where = str(folder)
    load = ("from peft import AutoPeftModelForCausalLM\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained({where!r})"
            if adapter else
            "from transformers import AutoModelForCausalLM\n"
            f"model = AutoModelForCausalLM.from_pretrained({where!r})")
    origin = f"\nMerged from the adapter in `{derived_from}` into its base.\n" if derived_from else ""
    metrics = {k: summary.get(k) for k in ("train_loss", "eval_loss", "best_step", "steps", "tokens", "elapsed_s",
                                           "eval_accuracy") if summary.get(k) is not None}
    table = "\n".join(f"| {k} | {_fmt(v) if isinstance(v, float) else v} |" for k, v in metrics.items())
    return f"""# {folder.name}

Trained with impruver{f' (preset `{plan.preset}`)' if plan.preset else ''}.
{origin}
- **Model:** {model}, {weights}
- **Method:** {describe_method(plan)}
- **Data:** {summary.get('train_samples', '?')} training and {summary.get('val_samples', 0)} validation samples from
{sources}
- **Training:** {training}
- **Tokens trained on:** {summary.get('tokens', 0) or 0:,}
- **Final train loss:** {_fmt(summary.get('train_loss'))}; **eval loss:** {_fmt(summary.get('eval_loss'))}{best}{_check_line(summary)}

## Final metrics

| metric | value |
|---|---|
{table}

## Use

```python
{load}
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained({where!r})
inputs = tokenizer.apply_chat_template([{{"role": "user", "content": "Hi!"}}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
reply = model.generate(**inputs)  # stops at the end of the reply; sampling settings from generation_config.json
```

`generation_config.json` holds the stop ids and the sampling settings `impruver chat` uses; the folder serves
as it is (`vllm serve {where}`).

## Plan

The plan of the run (also in `plan.yaml`; secrets redacted):

```yaml
{plan.to_yaml().rstrip()}
```
"""


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
