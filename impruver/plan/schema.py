"""The plan's schema: the frozen, typed sections of a validated run (no torch, no registry lookups at import).

Sections whose keys depend on a registered component are opened by it: the method section is
``{builder, **options}`` validated by the method component's own ``Options`` (a :class:`MethodSpec` subclass).
Names of registered things (``model.arch.family``, ``hardware.distributed``, builders) are plain strings here and
are checked against their registries by :mod:`impruver.plan.build`, so a plugin's names are accepted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, SerializeAsAny, ValidationError, field_validator

from impruver.errors import Problem, choices_hint

PLAN_VERSION = 2  # 2: the method section is {builder, **options}; family and distributed are registry names

# Keys whose values are secrets, matched as whole keys (case-insensitive, '-' read as '_'): `token` and
# `wandb_api_key` are secrets, `sep_token` and `max_tokens` are not. A name ending in one of the suffixes is too.
SECRET_NAMES = frozenset({"token", "api_key", "apikey", "password", "passwd", "secret", "hf_token", "access_token",
                          "auth_token", "refresh_token", "bearer_token", "secret_key", "private_key", "client_secret",
                          "credentials"})
SECRET_SUFFIXES = ("_api_key", "_apikey", "_password", "_secret", "_secret_key", "_access_token", "_auth_token",
                   "_hf_token", "_private_key")
# Sections whose keys are data, not settings: a source's `mapping: {token: text}` renames a field called token.
DATA_KEYED = frozenset({"mapping"})
# Environment variables whose values are secrets: one of these words in the name (HF_TOKEN, WANDB_API_KEY, ...).
SECRET_ENV_WORDS = frozenset({"TOKEN", "KEY", "APIKEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS", "PAT"})
SECRET_ENV_MIN_LEN = 8  # shorter values (`1`, `true`) would redact ordinary settings that happen to equal them


class Spec(BaseModel):
    """Base of every plan section: frozen, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


class ArchSpec(Spec):
    """A model architecture, enough to build it with random weights and to estimate its memory."""

    family: str  # registry 'families': gpt2, llama, mistral, qwen2, qwen3, or a plugin's
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
    # For the trained model's card (Hub metadata): its licence (a Hub licence id such as apache-2.0, mit) and the
    # languages it is trained for (ISO 639-1 codes).
    license: str | None = None
    language: list[str] = Field(default_factory=list)

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
    # Which of the model's turns are trained: a subset of [assistant, function_call] (None: both), and only the
    # last one of a conversation (earlier answers stay as context, out of the loss).
    roles_to_train: list[Literal["assistant", "function_call"]] | None = None
    train_on_last_turn_only: bool = False
    trust_remote_code: bool = False
    options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the format
    # Hub sources: read through datasets' streaming (only the rows read are fetched; no whole download). A split
    # with absolute bounds (train[:1000]) streams anyway; percentage bounds cannot stream.
    streaming: bool = False


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


class MethodSpec(Spec):
    """What is trained (``method:``): ``builder`` names a method component (registry 'methods': scratch, full,
    lora, qlora or a plugin's); its other keys are that component's options, validated by its ``Options`` (a
    subclass of this class), so ``plan.method`` is an instance of the component's own schema."""

    builder: str = "full"


class HardwareSpec(Spec):
    """Where and how it runs (``hardware:``)."""

    name: str = "cpu"
    device: Literal["cpu", "cuda"] = "cpu"
    gpu_memory_gib: float | None = Field(default=None, gt=0)  # per device, for the memory plan
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    distributed: str = "none"  # registry 'strategies': none, ddp, fsdp, deepspeed_zero2/3, or a plugin's
    num_processes: int = Field(default=1, ge=1)  # per machine
    num_machines: int = Field(default=1, ge=1)
    machine_rank: int = Field(default=0, ge=0)
    main_process_ip: str | None = None
    # None: a free port picked at each launch on one machine (a fixed one can still be held by a run just killed);
    # several machines need the same fixed port on each (the multinode group sets 29500).
    main_process_port: int | None = Field(default=None, gt=0, lt=65536)
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
    # Plan keys (or whole sections: `dataset`) a resume may change although they change the optimisation, e.g.
    # [train.lr, train.weight_decay]; they apply from the checkpoint's step and the run's record says so. A resume
    # that changes any other such key is refused with the list of differences.
    resume_changes: list[str] = Field(default_factory=list)
    report_to: list[str] = Field(default_factory=list)  # trackers accelerate supports: wandb, tensorboard, mlflow, ...
    num_workers: int = Field(default=0, ge=0)
    ddp: dict[str, Any] = Field(default_factory=dict)  # e.g. {ddp_find_unused_parameters: false}
    memory_check: bool = True  # stop before loading when the memory plan exceeds hardware.gpu_memory_gib

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, value: list[str]) -> list[str]:
        """Names of trackers the installed accelerate supports (its own list, read without importing torch)."""
        from impruver.train.metrics import tracker_names

        known = tracker_names()
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"unknown tracker {', '.join(map(repr, unknown))}; "
                             f"{choices_hint(unknown[0], known)}")
        return value


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
    # `impruver serve`'s Bearer key (required off loopback); also --api-key or $IMPRUVER_API_KEY. Never written to
    # plan.yaml, a log or a card: excluded from every dump.
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)


class EvalSpec(Spec):
    """What to ask and how much to show (``eval:``). Frozen; unknown keys are errors."""

    questions: str | None = None  # a JSONL question file, or "demo" (the demo's held-out set); None: no check
    max_new_tokens: int = Field(default=64, gt=0)  # reply length cap, in tokens
    show: int = Field(default=8, ge=0)  # example replies printed in the table (wrong ones first)


class ExportSpec(Spec):
    """What ``impruver export`` writes besides a merged adapter (``export:``). Frozen; unknown keys are errors."""

    # GGUF files for llama.cpp / Ollama (<output_dir>/gguf/<name>-<type>.gguf + a Modelfile each);
    # types: f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0. Empty: none (``impruver export --gguf`` names them too).
    gguf: list[str] = Field(default_factory=list)

    @field_validator("gguf", mode="before")
    @classmethod
    def _gguf_types(cls, value: Any) -> Any:
        """A comma string or a list; every type known (the message lists the valid ones)."""
        from impruver.errors import ConfigError
        from impruver.gguf import gguf_types

        if value in (None, "", []):
            return []
        try:
            return list(gguf_types(value if isinstance(value, str) else list(value)))
        except ConfigError as exc:
            raise ValueError("; ".join(p.message for p in exc.problems)) from None


class ObjectiveSpec(Spec):
    """What the loss is (``objective:``): ``name`` names an objective component (registry 'objectives': sft, dpo,
    ipo, orpo, simpo, kto or a plugin's); its other keys are that objective's options (``beta``, ...), validated
    by the objective's own ``Options`` (:mod:`impruver.objectives`) when the plan is built. Orthogonal to
    ``method``: every method trains with every objective."""

    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())

    name: str = "sft"

    @property
    def options(self) -> dict[str, Any]:
        """The objective's own options, as written (``lambda`` stays ``lambda``)."""
        return dict(self.model_extra or {})


class MemoryEstimate(Spec):
    """Peak GPU memory per device, in GiB, as estimated before anything loads."""

    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    overhead_gib: float
    reference_gib: float = 0.0  # a reference model the objective holds during training (frozen copy), if any
    total_gib: float
    budget_gib: float | None
    fits: bool | None
    trainable_params: int | None = None  # parameters that get gradients (the method's own count)
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
    method: SerializeAsAny[MethodSpec]  # the method component's own Options (see method_section)
    hardware: HardwareSpec
    train: TrainSpec
    chat: ChatSpec = ChatSpec()
    eval: EvalSpec = EvalSpec()  # the check a run ends with (impruver eval)
    export: ExportSpec = ExportSpec()  # what impruver export writes (GGUF types)
    objective: ObjectiveSpec = ObjectiveSpec()  # the loss: sft unless a preference objective is chosen
    memory: MemoryEstimate | None = None

    @field_validator("method", mode="before")
    @classmethod
    def _method_section(cls, value: Any) -> Any:
        """A mapping (a plan.yaml read back) is validated by its method component's own schema."""
        if isinstance(value, dict):
            from impruver.components import method_section

            return method_section(str(value.get("builder", "full"))).model_validate(value)
        return value

    # -- reading and writing -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return redact(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        from impruver.plan.io import to_yaml

        return to_yaml(self)

    def write(self, folder: str | os.PathLike[str] | None = None) -> Path:
        """Write ``plan.yaml`` into ``folder`` (default: the output dir) atomically; return its path."""
        from impruver.plan.io import write_plan

        return write_plan(self, folder)

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


def redact(value: Any, key: str = "", *, env: dict[str, str] | None = None) -> Any:
    """Replace secrets by '***' so they never reach a saved plan or a log.

    Two rules: a value under a secret key (:func:`is_secret_key`), and any occurrence, under any key, of the value
    of a secret environment variable (:func:`secret_env_values`: what ``${oc.env:HF_TOKEN}`` put in the config).
    The keys of data sections (a source's ``mapping``) are field names and are left alone.
    """
    secrets = secret_env_values(os.environ if env is None else env)
    return _redact(value, key, secrets)


def is_secret_key(key: str) -> bool:
    name = key.lower().replace("-", "_")
    return name in SECRET_NAMES or name.endswith(SECRET_SUFFIXES)


def secret_env_values(env: Any) -> list[str]:
    """Values of environment variables whose names hold a secret word (split at '_'), longest first."""
    values = {value for name, value in env.items()
              if len(value) >= SECRET_ENV_MIN_LEN and SECRET_ENV_WORDS & set(name.upper().split("_"))}
    return sorted(values, key=len, reverse=True)  # a longer secret containing a shorter one goes first


def _redact(value: Any, key: str, secrets: list[str]) -> Any:
    if isinstance(value, dict):
        if key in DATA_KEYED:
            return {k: _redact(v, "", secrets) for k, v in value.items()}
        return {k: _redact(v, str(k), secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, key, secrets) for v in value]
    if isinstance(value, str):
        if is_secret_key(key):
            return "***"
        for secret in secrets:
            value = value.replace(secret, "***")
    return value


# -- turning pydantic errors into Problems ---------------------------------------------------------------------

def problems_from(exc: ValidationError, spec: type[BaseModel], prefix: str = "") -> list[Problem]:
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
