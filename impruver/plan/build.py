"""Building a plan: a composed configuration validated into a frozen :class:`~impruver.plan.Plan`.

``make_plan(config, choices=...)`` checks every key, type and registry name, asks each component for its own
checks (a method's options and contradictions, through :func:`impruver.components.method_of`), runs the rules
that cross sections (only those live here) and raises one :class:`~impruver.errors.ConfigError` listing every
problem. Nothing heavy (torch, transformers, datasets) is imported: planning is a cheap dry run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from impruver import registry
from impruver.errors import ConfigError, Problem, choices_hint
from impruver.families import local_config
from impruver.layout import RunLayout
from impruver.plan.schema import (ChatSpec, DatasetSpec, EvalSpec, ExportSpec, HardwareSpec, MethodSpec, ModelSpec, ObjectiveSpec, Plan, Spec, TokenizerSpec,
                                  TrainSpec, problems_from)

# torch DistributedDataParallel settings a `ddp:` section may give (with or without the `ddp_` prefix).
DDP_ARGS = {"broadcast_buffers", "bucket_cap_mb", "find_unused_parameters", "check_reduction",
            "gradient_as_bucket_view", "static_graph"}


SECTIONS: dict[str, type[Spec]] = {
    "model": ModelSpec,
    "tokenizer": TokenizerSpec,
    "dataset": DatasetSpec,
    "method": MethodSpec,
    "hardware": HardwareSpec,
    "train": TrainSpec,
    "chat": ChatSpec,
    "eval": EvalSpec,
    "export": ExportSpec,
    "objective": ObjectiveSpec,
}
# Top-level shorthands users of the recipe catalogue type: `resume=auto`, and a `ddp:` section of DDP settings.
SHORTHANDS = {"resume": ("train", "resume"), "ddp": ("train", "ddp")}
TOP_LEVEL = {"preset", "output_dir", "train_path", "val_path", "seed", *SECTIONS, *SHORTHANDS}


def make_plan(config: dict[str, Any], *, choices: dict[str, str] | None = None) -> Plan:
    """Validate a composed configuration (plain dict) into a Plan, or raise ConfigError with every problem."""
    choices = dict(choices or {})
    missing = list(_missing(config))
    config = _expand_shorthands(_without_missing(config))
    problems: list[Problem] = [Problem(key, f"required: set it, e.g. {key}=VALUE") for key in missing]
    for key in config:
        if key not in TOP_LEVEL:
            problems.append(Problem(key, f"unknown key; {choices_hint(key, TOP_LEVEL)}"))

    sections: dict[str, Spec] = {}
    for name, spec in SECTIONS.items():
        raw = config.get(name)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            problems.append(Problem(name, f"must be a mapping, got {type(raw).__name__}"))
            continue
        if name == "method":
            spec = _method_schema(raw)
        try:
            sections[name] = spec.model_validate(raw)
        except ValidationError as exc:
            found = problems_from(exc, spec, prefix=name)
            for problem in found:
                if problem.key not in missing:
                    problems.extend(_with_owner(problem, raw, choices.get("method")) if name == "method" else [problem])

    problems.extend(_check_registry_names(sections))  # also for the sections that did validate
    problems.extend(_objective_checks(sections))
    if len(sections) == len(SECTIONS) and not any(p.key.startswith("method.builder") for p in problems):
        sections = _resolve_defaults(sections, choices)
        problems.extend(_check_rules(sections))
        problems.extend(_component_checks(sections))

    top = {k: config.get(k) for k in ("output_dir", "train_path", "val_path")}
    for key, value in top.items():
        if value is not None and not isinstance(value, str):
            problems.append(Problem(key, f"must be a path (string), got {value!r}"))
    seed = config.get("seed", 42)
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.append(Problem("seed", f"must be an integer, got {seed!r}"))
    if problems:
        raise ConfigError(problems)

    preset = config.get("preset") or choices.get("preset")
    output_dir = top["output_dir"] or default_output_dir(preset, choices)
    plan = Plan(
        preset=preset,
        choices={k: v for k, v in sorted(choices.items()) if v is not None},
        output_dir=output_dir,
        train_path=top["train_path"] or str(RunLayout.of(output_dir).train_data),
        val_path=top["val_path"] or str(RunLayout.of(output_dir).val_data),
        seed=seed,
        **sections,
    )
    return _with_memory_estimate(plan)


def _expand_shorthands(config: dict[str, Any]) -> dict[str, Any]:
    """``resume: auto`` -> ``train.resume``; ``ddp: {...}`` -> ``train.ddp`` (merged; the shorthand wins)."""
    config = dict(config)
    for short, (section, key) in SHORTHANDS.items():
        value = config.pop(short, None)
        if value is None or not isinstance(config.get(section, {}), dict):
            continue
        target = dict(config.get(section) or {})
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            value = {**target[key], **value}
        target[key] = value
        config[section] = target
    return config


MISSING = "???"  # Hydra's mark for a value the user must give


def _missing(config: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(config, dict):
        for key, value in config.items():
            yield from _missing(value, f"{prefix}{key}.")
    elif config == MISSING:
        yield prefix.rstrip(".")


def _without_missing(config: Any) -> Any:
    """The config without ``???`` values, so that each is reported once, as missing, not also as a bad value."""
    if isinstance(config, dict):
        return {k: _without_missing(v) for k, v in config.items() if v != MISSING}
    return config


def default_output_dir(preset: str | None, choices: dict[str, str]) -> str:
    """outputs/<preset>, or outputs/<model>_<method>_<dataset> from the selected options; a preference objective
    adds its name (outputs/demo-dpo), so a preference run never writes over the SFT run it starts from."""
    from impruver.layout import OUTPUTS_ROOT
    from impruver.objectives import objective_class, objective_names

    objective = choices.get("objective")
    preference = objective in objective_names() and objective_class(objective).preference
    named = bool(preset and objective and preset.endswith(f"_{objective}"))  # rugpt3large/760M_lora_saiga2_dpo
    suffix = f"-{objective}" if preference and not named else ""
    if preset:
        return os.path.join(OUTPUTS_ROOT, preset + suffix)
    parts = [choices.get(g) for g in ("model", "method", "dataset")]
    return os.path.join(OUTPUTS_ROOT, "_".join(p.replace("/", "-") for p in parts if p) or "run") + suffix


def _method_schema(raw: dict[str, Any]) -> type[MethodSpec]:
    """The method section's schema: the named component's Options (the base section when the name is unknown,
    which is reported once, by the registry check)."""
    from impruver.components import method_section

    builder = raw.get("builder", MethodSpec.model_fields["builder"].default)
    if not isinstance(builder, str) or not registry.has("methods", builder):
        return _BareMethod
    try:
        return method_section(builder)
    except Exception:  # a broken plugin: reported by the registry check below
        return _BareMethod


class _BareMethod(MethodSpec):
    """A method section whose builder is unknown: only `builder` is read (its options cannot be checked)."""

    model_config = {**MethodSpec.model_config, "extra": "ignore"}


def _with_owner(problem: Problem, raw: dict[str, Any], chosen: str | None = None) -> list[Problem]:
    """An option of another method (``method.lora`` with method=full) says which methods take it, and what is
    wrong inside it for the first of them (``method.lora.rr``: did you mean 'r'), so both fixes show at once.
    ``chosen``: the method group the config chose; when it takes the option, a later config (a preset for an
    objective) set another builder over it, and the fix is to name the builder too."""
    parts = problem.key.split(".")
    if len(parts) != 2 or parts[0] != "method" or "unknown key" not in problem.message:
        return [problem]
    from impruver.components import method_section, methods_taking

    owners = methods_taking(parts[1])
    if not owners:
        return [problem]
    if chosen in owners:
        fix = (f"method={chosen} was chosen, but a config merged after it (a preset for this objective) set "
               f"method.builder={raw.get('builder')}; add method.builder={chosen}")
    else:
        fix = f"choose method={owners[0]} to use it"
    owned = Problem(problem.key, f"{problem.message}; '{parts[1]}' is an option of method {', '.join(owners)}: {fix}")
    schema = method_section(owners[0])
    try:
        schema.model_validate({"builder": owners[0], parts[1]: raw.get(parts[1])})
    except ValidationError as exc:
        return [owned, *(p for p in problems_from(exc, schema, prefix="method") if p.key != problem.key)]
    return [owned]


def _resolve_defaults(sections: dict[str, Any], choices: dict[str, str]) -> dict[str, Any]:
    """Fill what depends on other sections: the tokenizer's builder, path and template, random weights for a
    method that starts from them."""
    from impruver.components import method_named

    model: ModelSpec = sections["model"]
    tok: TokenizerSpec = sections["tokenizer"]
    if method_named(sections["method"].builder).random_init and model.weights != "random":
        model = model.model_copy(update={"weights": "random"})
    updates: dict[str, Any] = {}
    if tok.builder == AUTO:
        # A pretrained model brings its tokenizer; a model built from scratch gets one trained on its data.
        if model.path:
            updates.update(builder=PRETRAINED_TOKENIZER, path=tok.path or model.path,
                           trust_remote_code=model.trust_remote_code)
        else:
            updates.update(builder=TRAINED_TOKENIZER)
    if tok.chat_template is None and model.chat_template is not None:
        updates["chat_template"] = model.chat_template
    return {**sections, "model": model, "tokenizer": tok.model_copy(update=updates)}


AUTO = "auto"  # tokenizer.builder: chosen from the model (below)
PRETRAINED_TOKENIZER = "hf"  # the default tokenizer of a model with a path: the one saved with it
TRAINED_TOKENIZER = "bpe"  # the default tokenizer of a model built from `arch`: one trained on the data


def _check_registry_names(sections: dict[str, Any]) -> list[Problem]:
    checks = []
    for section, field_name, kind in (("model", "builder", "models"), ("tokenizer", "builder", "tokenizers"),
                                      ("method", "builder", "methods"), ("train", "optimizer", "optimizers"),
                                      ("train", "scheduler", "schedulers"), ("hardware", "distributed", "strategies")):
        if section in sections and getattr(sections[section], field_name) != AUTO:
            checks.append((f"{section}.{field_name}", kind, getattr(sections[section], field_name)))
    arch = sections["model"].arch if "model" in sections else None
    if arch is not None:
        checks.append(("model.arch.family", "families", arch.family))
    if "dataset" in sections:
        for name, source in sections["dataset"].sources.items():
            checks.append((f"dataset.sources.{name}.format", "formats", source.format))
    template = sections["tokenizer"].chat_template if "tokenizer" in sections else None
    if template and not _is_inline_template(template) and not template.endswith(".jinja"):
        checks.append(("tokenizer.chat_template", "templates", template))
    problems = []
    for key, kind, name in checks:
        if not registry.has(kind, name):
            problems.append(Problem(key, f"unknown {registry.singular(kind)} '{name}'; "
                                    f"{choices_hint(name, registry.names(kind))}"))
    problems.extend(_check_builder_options(sections))
    return problems


def _component_checks(sections: dict[str, Any]) -> list[Problem]:
    """Each component's own checks, on a draft of the plan (every section valid, nothing derived yet)."""
    from impruver.components import method_named

    draft = Plan.model_construct(output_dir="", train_path="", val_path="", **sections)
    return method_named(draft.method.builder).check(draft)


def _objective_checks(sections: dict[str, Any]) -> list[Problem]:
    """The objective's name and options (its own schema, with the valid choices), its own rules given whether
    the method trains an adapter, and whether every source's format gives the records it trains on."""
    from impruver.components import method_named
    from impruver.objectives import check_objective, data_problems, objective_names

    spec = sections.get("objective")
    if spec is None:
        return []
    method = sections.get("method")
    adapter = bool(method is not None and registry.has("methods", method.builder)
                   and method_named(method.builder).adapter)
    problems = check_objective(spec.name, spec.options, "objective", adapter=adapter)
    if problems or spec.name not in objective_names() or "dataset" not in sections:
        return problems
    from impruver.data.preference import produces_of

    produces = {name: produces_of(registry.lookup("formats", source.format))
                for name, source in sections["dataset"].sources.items()
                if source.enabled and source.format != AUTO and registry.has("formats", source.format)}
    return data_problems(spec.name, produces)


def _check_builder_options(sections: dict[str, Any]) -> list[Problem]:
    """`options:` of a component must match its builder's keyword-only parameters."""
    from impruver.signature import check_options  # local: imports the builder module only when needed

    problems = []
    for section, kind in (("model", "models"), ("tokenizer", "tokenizers")):
        spec = sections.get(section)
        if spec is None:
            continue
        if spec.options and registry.has(kind, spec.builder):
            problems.extend(check_options(kind, spec.builder, spec.options, key=f"{section}.options"))
    for name, source in (sections["dataset"].sources.items() if "dataset" in sections else ()):
        if source.options and registry.has("formats", source.format):
            problems.extend(
                check_options("formats", source.format, source.options, key=f"dataset.sources.{name}.options")
            )
    return problems


def _is_inline_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def _check_rules(sections: dict[str, Any]) -> list[Problem]:
    """Contradictions between sections, found before anything loads."""
    from impruver.components import tokenizer_needs_texts, tokenizer_reads_path

    model: ModelSpec = sections["model"]
    tok: TokenizerSpec = sections["tokenizer"]
    hw: HardwareSpec = sections["hardware"]
    train: TrainSpec = sections["train"]
    dataset: DatasetSpec = sections["dataset"]
    problems: list[Problem] = []

    if model.path is None and model.arch is None and model.class_path is None:
        problems.append(Problem("model", "needs `path` (a Hub id or local folder) or `arch` (to build it from scratch)"))
    if model.weights == "random" and model.arch is None and not local_config(model.path):
        problems.append(Problem("model.arch", "random weights need the architecture: give model.arch, or a local "
                                "model.path with a config.json (the Hub is not consulted for this)"))
    if tok.path is None and tokenizer_reads_path(tok.builder):
        trained = [n for n in registry.names("tokenizers") if tokenizer_needs_texts(n)]
        problems.append(Problem("tokenizer.path", f"the {tok.builder} tokenizer is loaded from a folder or Hub id and "
                                "none is given (the model has no path either): set tokenizer.path, or use a "
                                f"tokenizer trained on the data ({', '.join(f'tokenizer={n}' for n in trained)})"))
    if tok.chat_template is None and not _tokenizer_has_template(tok):
        problems.append(Problem("tokenizer.chat_template",
                                f"the tokenizer at '{tok.path or tok.builder}' has no chat template and none is "
                                f"configured; set tokenizer.chat_template to one of: "
                                f"{', '.join(registry.names('templates'))}"))
    if tok.chat_template and tok.chat_template.endswith(".jinja") and not Path(tok.chat_template).is_file():
        problems.append(Problem("tokenizer.chat_template", f"no template file at {tok.chat_template}"))
    if hw.mixed_precision != "no" and hw.device == "cpu" and hw.mixed_precision == "fp16":
        problems.append(Problem("hardware.mixed_precision", "fp16 needs a GPU; use bf16 or no on the CPU"))
    if hw.machine_rank >= hw.num_machines:
        problems.append(Problem("hardware.machine_rank",
                                f"{hw.machine_rank} is not below num_machines={hw.num_machines}"))
    if hw.num_machines > 1 and not hw.main_process_ip:
        problems.append(Problem("hardware.main_process_ip", "a multi-machine run needs the main machine's address"))
    if hw.num_machines > 1 and hw.main_process_port is None:
        problems.append(Problem("hardware.main_process_port", "a multi-machine run needs one port, the same on every "
                                "machine (e.g. hardware.main_process_port=29500)"))
    for key in train.ddp:
        if key.removeprefix("ddp_") not in DDP_ARGS:
            problems.append(Problem(f"train.ddp.{key}", f"not a DistributedDataParallel setting; "
                                    f"{choices_hint(key, sorted(f'ddp_{a}' for a in DDP_ARGS))}"))
    if train.resume not in ("never", "auto") and not Path(train.resume).is_dir():
        problems.append(Problem("train.resume", f"'{train.resume}' is neither never, auto nor a checkpoint folder"))
    if not any(s.enabled for s in dataset.sources.values()):
        problems.append(Problem("dataset.sources", "every source is disabled: enable at least one"))
    for name, source in dataset.sources.items():
        if source.limit is not None and source.fraction is not None:
            problems.append(Problem(f"dataset.sources.{name}", "give limit or fraction, not both"))
    return problems


def _tokenizer_has_template(tok: TokenizerSpec) -> bool:
    """False only when we know there is none: a local tokenizer folder without one, or one trained on the data."""
    from impruver.components import tokenizer_needs_texts, tokenizer_reads_path

    if tokenizer_needs_texts(tok.builder):
        return False  # trained here: it starts with no template
    if not tokenizer_reads_path(tok.builder) or not tok.path or not Path(tok.path).is_dir():
        return True  # a Hub tokenizer or one built otherwise: cannot be checked offline before loading
    folder = Path(tok.path)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
        except ValueError:
            return True
    return False


def _with_memory_estimate(plan: Plan) -> Plan:
    """Attach the memory plan (see impruver.memory) when the architecture is known."""
    from impruver.memory import estimate_memory

    estimate = estimate_memory(plan)
    return plan.model_copy(update={"memory": estimate}) if estimate else plan
