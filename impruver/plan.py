"""The plan: a composed configuration validated into a frozen, typed, printable value.

``make_plan(config, choices=...)`` checks every key, type, registry name and cross-field rule and raises one
:class:`~impruver.errors.ConfigError` listing every problem. Nothing heavy (torch, transformers, datasets) is
imported here, so planning is a cheap dry run. ``Plan.to_yaml`` / ``load_plan`` write and read ``plan.yaml``,
which is what later stages and other processes read back (never the raw Hydra config).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from impruver import registry
from impruver.errors import ConfigError, Problem, choices_hint
from impruver.files import atomic_write_text
from impruver.layout import PLAN_FILE

PLAN_VERSION = 1

# Module names of the architectures impruver knows, for checking LoRA targets before anything loads.
ARCH_MODULES: dict[str, set[str]] = {
    "gpt2": {"c_attn", "c_proj", "c_fc", "lm_head", "wte", "wpe"},
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"},
}
for _family in ("mistral", "qwen2", "qwen3"):
    ARCH_MODULES[_family] = ARCH_MODULES["llama"]

# torch DistributedDataParallel settings a `ddp:` section may give (with or without the `ddp_` prefix).
DDP_ARGS = {"broadcast_buffers", "bucket_cap_mb", "find_unused_parameters", "check_reduction",
            "gradient_as_bucket_view", "static_graph"}
SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)$", re.IGNORECASE)
SECRET_KEY_ALLOWED = {"bos_token", "eos_token", "pad_token", "unk_token", "max_tokens", "max_new_tokens"}


class Spec(BaseModel):
    """Base of every plan section: frozen, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


class ArchSpec(Spec):
    """A model architecture, enough to build it with random weights and to estimate its memory."""

    family: Literal["gpt2", "llama", "mistral", "qwen2", "qwen3"]
    n_layer: int = Field(gt=0)
    n_embd: int = Field(gt=0)  # hidden width
    n_head: int = Field(gt=0)
    n_kv_head: int | None = Field(default=None, gt=0)  # grouped-query attention (llama family)
    n_inner: int | None = Field(default=None, gt=0)  # MLP width; None: 4 x n_embd (gpt2)
    n_positions: int = Field(default=2048, gt=0)  # context length
    vocab_size: int = Field(default=50257, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    sliding_window: int | None = None


class ModelSpec(Spec):
    """What model to build and how (``model:`` in the config)."""

    builder: str = "hf"  # registry 'models'
    path: str | None = None  # Hub id or local folder; None: built from `arch`
    arch: ArchSpec | None = None  # the architecture, for from-scratch and random-weight builds
    weights: Literal["pretrained", "random"] = "pretrained"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention", "auto"] = "auto"  # auto: flash-attention 2 when installed (CUDA, 16-bit), else sdpa
    trust_remote_code: bool = False  # off unless the user turns it on for this model
    revision: str | None = None
    class_path: str | None = None  # explicit escape hatch: the user's own model class, "pkg.module:Class"
    chat_template: str | None = None  # the template this model was trained with, when its tokenizer has none
    context_length: int | None = Field(default=None, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)  # extra keyword arguments of a plugin's builder

    @field_validator("class_path")
    @classmethod
    def _dotted(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][\w.]*[:.][A-Za-z_]\w*", value):
            raise ValueError("must be a dotted path such as 'my_pkg.models:MyModel'")
        return value


class TokenizerSpec(Spec):
    """Which tokenizer, and its chat template (``tokenizer:``)."""

    builder: str = "auto"  # registry 'tokenizers': auto (the model's), hf, bpe (trained by impruver)
    path: str | None = None  # None with builder auto: the model's path
    chat_template: str | None = None  # a registered template name, a .jinja file, or Jinja source
    class_path: str | None = None  # explicit escape hatch: the user's own tokenizer class
    special_tokens: dict[str, str] = Field(default_factory=dict)  # e.g. {pad_token: "<pad>"}
    trust_remote_code: bool = False
    # Options of the `bpe` builder (a byte-level BPE trained on the composed data):
    vocab_size: int = Field(default=4096, gt=256)
    min_frequency: int = Field(default=2, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)


class SourceSpec(Spec):
    """One dataset in the mix."""

    path: str  # Hub dataset id, or a local json / jsonl / parquet / csv / txt file or folder
    format: str  # registry 'formats'
    enabled: bool = True
    split: str = "train"  # slicing allowed: train[:1000], train[10%:]
    subset: str | None = None
    revision: str | None = None
    mapping: dict[str, str] = Field(default_factory=dict)  # field renames applied before the format: {from: to}
    limit: int | None = Field(default=None, gt=0)  # keep at most this many records
    fraction: float | None = Field(default=None, gt=0, le=1)  # keep this share of the records
    weight: float = Field(default=1.0, gt=0)  # up- (>1) or down-sampling (<1) in the mix
    only_target_loss: bool = True  # loss only on assistant / function_call turns
    max_tokens: int | None = Field(default=None, gt=0)  # this source's own length limit
    add_bos: bool = False
    add_eos: bool = False
    system: str | None = None  # a system prompt added to conversations that have none
    trust_remote_code: bool = False
    options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the format


class DedupSpec(Spec):
    exact: bool = True  # drop conversations whose normalized text repeats
    near: bool = True  # MinHash LSH over word shingles
    threshold: float = Field(default=0.85, gt=0, le=1)  # estimated Jaccard similarity that counts as a duplicate
    num_perm: int = Field(default=128, ge=16, le=1024)
    shingle_size: int = Field(default=5, ge=1)  # words per shingle (order-aware)


class DatasetSpec(Spec):
    """The mix of sources and how it becomes train / validation sets (``dataset:``)."""

    sources: dict[str, SourceSpec]
    val_fraction: float | None = Field(default=0.05, ge=0, lt=1)
    val_size: int | None = Field(default=None, ge=0)  # overrides val_fraction
    seed: int = 42
    dedup: DedupSpec = DedupSpec()
    max_tokens: int | None = Field(default=None, gt=0)  # None: the model's context length
    length_policy: Literal["drop", "truncate"] = "drop"
    on_error: Literal["raise", "skip"] = "raise"
    num_proc: int | None = Field(default=None, ge=1)  # None: all cores


class LoraSpec(Spec):
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["auto", "all-linear"] = "auto"  # auto: per-architecture default
    modules_to_save: list[str] = Field(default_factory=list)  # e.g. [lm_head]
    use_dora: bool = False
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"


class QuantizationSpec(Spec):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class MethodSpec(Spec):
    """What is trained (``method:``): scratch, full, lora, qlora."""

    builder: str = "full"  # registry 'methods'
    lora: LoraSpec | None = None
    quantization: QuantizationSpec | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class HardwareSpec(Spec):
    """Where and how it runs (``hardware:``)."""

    name: str = "cpu"
    device: Literal["cpu", "cuda"] = "cpu"
    gpu_memory_gib: float | None = Field(default=None, gt=0)  # per device, for the memory plan
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    distributed: str = "none"  # registry 'strategies'
    num_processes: int = Field(default=1, ge=1)  # per machine
    num_machines: int = Field(default=1, ge=1)
    machine_rank: int = Field(default=0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int = Field(default=29500, gt=0, lt=65536)
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    options: dict[str, Any] = Field(default_factory=dict)  # extra accelerate launch settings


class TrainSpec(Spec):
    """The optimisation (``train:``). Batch sizes count rows per device per micro-step."""

    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0)  # optimizer steps; caps epochs
    batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=3e-4, gt=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)  # final LR / peak LR of the schedule
    warmup_steps: int = Field(default=0, ge=0)
    scheduler: str = "cosine"  # registry 'schedulers'
    optimizer: str = "adamw"  # registry 'optimizers'
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    gradient_checkpointing: bool = False
    packing: bool = True  # several samples per row, never attending to each other
    max_seq_len: int | None = Field(default=None, gt=0)  # row length; None: dataset.max_tokens or the context
    compile: bool | Literal["auto"] = "auto"  # torch.compile the model; auto: on a GPU, not on the CPU
    eval_steps: int | None = Field(default=100, gt=0)
    save_steps: int | None = Field(default=100, gt=0)
    save_total_limit: int = Field(default=2, ge=1)
    load_best_at_end: bool = True
    logging_steps: int = Field(default=10, gt=0)
    seed: int = 42
    resume: str = "never"  # never | auto | a checkpoint folder
    report_to: list[Literal["wandb", "tensorboard"]] = Field(default_factory=list)
    num_workers: int = Field(default=0, ge=0)
    ddp: dict[str, Any] = Field(default_factory=dict)  # e.g. {ddp_find_unused_parameters: false}
    memory_check: bool = True  # stop before loading when the memory plan exceeds hardware.gpu_memory_gib


class ChatSpec(Spec):
    """Generation settings for `impruver chat` and `impruver serve` (``chat:``)."""

    max_new_tokens: int = Field(default=256, gt=0)
    temperature: float = Field(default=0.7, ge=0)
    top_p: float = Field(default=0.9, gt=0, le=1)
    top_k: int = Field(default=50, ge=0)
    repetition_penalty: float = Field(default=1.1, gt=0)
    do_sample: bool = True
    seed: int = 42
    system_prompt: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)


class MemoryEstimate(Spec):
    """Peak GPU memory per device, in GiB, as estimated before anything loads."""

    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    overhead_gib: float
    total_gib: float
    budget_gib: float | None
    fits: bool | None
    suggestions: list[str] = Field(default_factory=list)


class Plan(Spec):
    """A validated run: everything a stage needs, nothing it has to look up in the raw config."""

    version: int = PLAN_VERSION
    preset: str | None = None
    choices: dict[str, str] = Field(default_factory=dict)  # the config-group options that were selected
    output_dir: str
    train_path: str
    val_path: str
    seed: int = 42
    model: ModelSpec
    tokenizer: TokenizerSpec
    dataset: DatasetSpec
    method: MethodSpec
    hardware: HardwareSpec
    train: TrainSpec
    chat: ChatSpec = ChatSpec()
    memory: MemoryEstimate | None = None

    # -- reading and writing -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return redact(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=120)

    def write(self, folder: str | os.PathLike[str] | None = None) -> Path:
        """Write ``plan.yaml`` into ``folder`` (default: the output dir) atomically; return its path."""
        target = Path(folder or self.output_dir) / PLAN_FILE
        atomic_write_text(target, self.to_yaml())
        return target

    @property
    def sources(self) -> dict[str, SourceSpec]:
        """The enabled dataset sources."""
        return {name: s for name, s in self.dataset.sources.items() if s.enabled}

    @property
    def context_length(self) -> int:
        """Tokens per sample the model takes."""
        if self.model.context_length:
            return self.model.context_length
        if self.model.arch:
            return self.model.arch.n_positions
        return 2048

    @property
    def max_tokens(self) -> int:
        """The dataset-wide length limit in tokens."""
        return min(self.dataset.max_tokens or self.context_length, self.context_length)

    @property
    def seq_len(self) -> int:
        """Tokens per training row."""
        return self.train.max_seq_len or self.max_tokens


def redact(value: Any, key: str = "") -> Any:
    """Replace secrets (API keys, tokens, passwords) by '***' so they never reach a saved plan or a log."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str) and key not in SECRET_KEY_ALLOWED and SECRET_KEY.search(key):
        return "***"
    return value


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a ``plan.yaml`` (a file, or the folder holding one) written by :meth:`Plan.write`."""
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_FILE
    if not path.is_file():
        raise ConfigError([Problem("", f"no plan at {path}: run `impruver plan` or a training job first")])
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_problems_from(exc, Plan), source=str(path)) from None


# -- validation ------------------------------------------------------------------------------------------------

SECTIONS: dict[str, type[Spec]] = {
    "model": ModelSpec,
    "tokenizer": TokenizerSpec,
    "dataset": DatasetSpec,
    "method": MethodSpec,
    "hardware": HardwareSpec,
    "train": TrainSpec,
    "chat": ChatSpec,
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
        try:
            sections[name] = spec.model_validate(raw)
        except ValidationError as exc:
            problems.extend(p for p in _problems_from(exc, spec, prefix=name) if p.key not in missing)

    if len(sections) == len(SECTIONS):
        sections = _resolve_defaults(sections, choices)
        problems.extend(_check_rules(sections))
    problems.extend(_check_registry_names(sections))  # also for the sections that did validate

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
        train_path=top["train_path"] or os.path.join(output_dir, "data", "train.jsonl"),
        val_path=top["val_path"] or os.path.join(output_dir, "data", "val.jsonl"),
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
    """outputs/<preset>, or outputs/<model>_<method>_<dataset> from the selected options."""
    if preset:
        return os.path.join("outputs", preset)
    parts = [choices.get(g) for g in ("model", "method", "dataset")]
    return os.path.join("outputs", "_".join(p.replace("/", "-") for p in parts if p) or "run")


def _resolve_defaults(sections: dict[str, Any], choices: dict[str, str]) -> dict[str, Any]:
    """Fill what depends on other sections: the tokenizer's path and template, scratch models' weights."""
    model: ModelSpec = sections["model"]
    tok: TokenizerSpec = sections["tokenizer"]
    method: MethodSpec = sections["method"]
    if method.builder == "scratch" and model.weights != "random":
        model = model.model_copy(update={"weights": "random"})
    updates: dict[str, Any] = {}
    if tok.builder == "auto":
        # A pretrained model brings its tokenizer; a model built from scratch gets one trained on its data.
        if model.path:
            updates.update(builder="hf", path=tok.path or model.path, trust_remote_code=model.trust_remote_code)
        else:
            updates.update(builder="bpe")
    if tok.chat_template is None and model.chat_template is not None:
        updates["chat_template"] = model.chat_template
    if method.builder in ("lora", "qlora") and method.lora is None:
        method = method.model_copy(update={"lora": LoraSpec()})
    if method.builder == "qlora" and method.quantization is None:
        method = method.model_copy(update={"quantization": QuantizationSpec()})
    return {**sections, "model": model, "tokenizer": tok.model_copy(update=updates), "method": method}


def _check_registry_names(sections: dict[str, Any]) -> list[Problem]:
    checks = []
    for section, field_name, kind in (("model", "builder", "models"), ("tokenizer", "builder", "tokenizers"),
                                      ("method", "builder", "methods"), ("train", "optimizer", "optimizers"),
                                      ("train", "scheduler", "schedulers"), ("hardware", "distributed", "strategies")):
        if section in sections and getattr(sections[section], field_name) != "auto":
            checks.append((f"{section}.{field_name}", kind, getattr(sections[section], field_name)))
    if "dataset" in sections:
        for name, source in sections["dataset"].sources.items():
            checks.append((f"dataset.sources.{name}.format", "formats", source.format))
    template = sections["tokenizer"].chat_template if "tokenizer" in sections else None
    if template and not _is_inline_template(template) and not template.endswith(".jinja"):
        checks.append(("tokenizer.chat_template", "templates", template))
    problems = []
    for key, kind, name in checks:
        if not registry.has(kind, name):
            problems.append(Problem(key, f"unknown {kind[:-1]} '{name}'; {choices_hint(name, registry.names(kind))}"))
    problems.extend(_check_builder_options(sections))
    return problems


def _check_builder_options(sections: dict[str, Any]) -> list[Problem]:
    """`options:` of a component must match its builder's keyword-only parameters."""
    from impruver.signature import check_options  # local: imports the builder module only when needed

    problems = []
    for section, kind in (("model", "models"), ("tokenizer", "tokenizers"), ("method", "methods")):
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
    model: ModelSpec = sections["model"]
    tok: TokenizerSpec = sections["tokenizer"]
    method: MethodSpec = sections["method"]
    hw: HardwareSpec = sections["hardware"]
    train: TrainSpec = sections["train"]
    dataset: DatasetSpec = sections["dataset"]
    problems: list[Problem] = []

    if method.builder == "qlora":
        if hw.device != "cuda":
            problems.append(Problem("method", "qlora loads a 4/8-bit base through bitsandbytes, which needs CUDA; "
                                    f"hardware '{hw.name}' has none: use method=lora, or hardware=gpu24gb on a GPU"))
    if method.builder not in ("lora", "qlora") and method.lora is not None:
        problems.append(Problem("method.lora", f"LoRA settings given, but method is '{method.builder}'; "
                                "choose method=lora (or qlora) to train an adapter"))
    if model.path is None and model.arch is None and model.class_path is None:
        problems.append(Problem("model", "needs `path` (a Hub id or local folder) or `arch` (to build it from scratch)"))
    if model.weights == "random" and model.arch is None and not _local_config(model.path):
        problems.append(Problem("model.arch", "random weights need the architecture: give model.arch, or a local "
                                "model.path with a config.json (the Hub is not consulted for this)"))
    if method.builder == "scratch" and tok.builder == "hf" and tok.path is None:
        problems.append(Problem("tokenizer.path", "a model trained from scratch needs a tokenizer: set tokenizer.path "
                                "or use tokenizer=bpe to train one"))
    family = _arch_family(model)
    if method.lora is not None and isinstance(method.lora.target_modules, list) and family in ARCH_MODULES:
        known = ARCH_MODULES[family]
        for i, target in enumerate(method.lora.target_modules):
            if target not in known:
                problems.append(Problem(f"method.lora.target_modules[{i}]",
                                        f"'{target}' is not a module of {family} models; "
                                        f"{choices_hint(target, known)}"))
    if method.lora is not None and family in ARCH_MODULES:
        for i, target in enumerate(method.lora.modules_to_save):
            if target not in ARCH_MODULES[family]:
                problems.append(Problem(f"method.lora.modules_to_save[{i}]",
                                        f"'{target}' is not a module of {family} models; "
                                        f"{choices_hint(target, ARCH_MODULES[family])}"))
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


def environment_problems(plan: Plan) -> list[Problem]:
    """What this machine lacks to run the plan (no torch import): warnings for `impruver plan`, errors for a run."""
    problems = []
    needs_bnb = []
    if plan.method.builder == "qlora":
        needs_bnb.append("method=qlora")
    if plan.train.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        needs_bnb.append(f"train.optimizer={plan.train.optimizer}")
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(Problem("method" if plan.method.builder == "qlora" else "train.optimizer",
                                f"{' and '.join(needs_bnb)} need bitsandbytes, which is not installed here "
                                "(pip install bitsandbytes; CUDA only); on this machine use method=lora / "
                                "train.optimizer=adamw"))
    if plan.hardware.distributed.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        problems.append(Problem("hardware.distributed", f"{plan.hardware.distributed} needs DeepSpeed: "
                                "pip install deepspeed, or use hardware=fsdp"))
    if plan.hardware.device == "cuda" and not _has_nvidia_driver():
        problems.append(Problem("hardware", f"profile '{plan.hardware.name}' needs a CUDA GPU and none is visible "
                                "here; use hardware=cpu to run on this machine"))
    return problems


def _has_nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia").exists() or os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1")


def _local_config(path: str | None) -> dict[str, Any] | None:
    if path and Path(path, "config.json").is_file():
        try:
            return json.loads(Path(path, "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    return None


def _arch_family(model: ModelSpec) -> str | None:
    if model.arch is not None:
        return model.arch.family
    config = _local_config(model.path)
    return config.get("model_type") if config else None


def _tokenizer_has_template(tok: TokenizerSpec) -> bool:
    """False only when we know there is none: a local tokenizer folder without one, or a freshly trained BPE."""
    if tok.builder == "bpe":
        return False
    if tok.builder != "hf" or not tok.path or not Path(tok.path).is_dir():
        return True  # a Hub tokenizer or a plugin's: cannot be checked offline before loading
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


# -- turning pydantic errors into Problems ---------------------------------------------------------------------


def _problems_from(exc: ValidationError, spec: type[BaseModel], prefix: str = "") -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join([prefix, *loc] if prefix else loc)
        if err["type"] == "extra_forbidden":
            fields = _fields_at(spec, err["loc"][:-1])
            bad = loc[-1]
            hint = choices_hint(bad, fields) if fields else ""
            problems.append(Problem(key, f"unknown key '{bad}'; {hint}".rstrip("; ")))
        elif err["type"] == "missing":
            problems.append(Problem(key, "required but missing"))
        else:
            problems.append(Problem(key, f"{err['msg']} (got {_short(err.get('input'))})"))
    return problems


def _fields_at(spec: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the nested model at ``loc`` (dict keys and list indexes are skipped)."""
    current: Any = spec
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            continue  # a dict key such as a source's name
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside Optional[...] / dict[str, ...] / list[...] annotations."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = [
    "ArchSpec", "ChatSpec", "DatasetSpec", "DedupSpec", "HardwareSpec", "LoraSpec", "MemoryEstimate",
    "MethodSpec", "ModelSpec", "Plan", "QuantizationSpec", "SourceSpec", "TokenizerSpec", "TrainSpec",
    "atomic_write_text", "environment_problems", "load_plan", "make_plan", "redact",
]
