"""Find and load what a run left in its ``output_dir``: a full model, an exported merged model, or a peft adapter
(LoRA, IA3 or any other adapter type peft saves: the folder says what it is, not the method's name).

The folder is checked before anything heavy is imported, so a missing or half-written one (no weights, no
tokenizer, a training run still writing checkpoints, a truncated safetensors file) gives a clear
:class:`~impruver.errors.RunError` at once, naming the folder, what is missing and the command that makes it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from impruver.errors import RunError
from impruver.hub import hub_unreachable, is_local, offline
from impruver.layout import CHECKPOINT_PREFIX, MERGED_DIR, RunLayout

if TYPE_CHECKING:
    from impruver.plan import ChatSpec, Plan

Kind = Literal["full", "merged", "adapter"]

# Where `impruver export` may put the standalone merged model inside a run's output_dir.
MERGED_SUBDIRS = (MERGED_DIR, "export", "exported")
DISPLAY_NAMES = {"LORA": "LoRA"}  # peft_type as people write it (others read well as peft spells them: IA3, ...)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header larger than this is damaged, not real


@dataclass(frozen=True)
class Found:
    """A loadable model folder: where the weights are, what kind they are, and (adapters) the base model."""

    folder: Path
    kind: Kind
    base: str | None = None  # the adapter's base model: a local folder (or a Hub id when online)
    adapter_type: str | None = None  # peft_type of an adapter's adapter_config.json (LORA, IA3, ...)
    tokenizer_dirs: tuple[Path, ...] = ()  # where to look for the tokenizer, best first


@dataclass
class Loaded:
    """A model ready to chat with: the torch model in eval mode, its tokenizer (with a chat template), limits."""

    model: Any
    tokenizer: Any
    found: Found
    context_length: int  # tokens the model can attend to (prompt + reply)
    name: str  # shown to users and returned as the model id by the server

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def describe(self) -> str:
        """One line for people: which folder, what kind, on which base."""
        kind = self.found.adapter_type or "peft"
        adapter = f"{DISPLAY_NAMES.get(kind, kind)} adapter"
        what = {"full": "model", "merged": "merged model", "adapter": adapter}[self.found.kind]
        base = f" on {self.found.base}" if self.found.base else ""
        return f"{what} {self.found.folder}{base} ({self.context_length} tokens of context, {self.device})"


# -- finding the folder (no torch) -----------------------------------------------------------------------------


def locate(output_dir: str | os.PathLike[str], *, model_path: str | None = None) -> Found:
    """Decide what to load from ``output_dir``, or raise RunError saying what is missing and how to make it.

    Order: a full model in the folder itself; an exported merged model in ``merged/`` (or ``export/``); a LoRA
    adapter in the folder (on the base named by its adapter_config.json, the run's plan.yaml, or ``model_path``).

    Args:
        output_dir: the run's output folder (``output_dir=`` of the command).
        model_path: the plan's ``model.path``, a fallback base for an adapter.

    Returns:
        What was found.

    Raises:
        RunError: nothing loadable there, or it is incomplete.
    """
    folder = Path(output_dir).expanduser()
    if not folder.is_dir():
        raise RunError(f"{folder} does not exist, so there is no model to chat with. Train one first: "
                       f"`{_command('train', folder)}`, or point output_dir= at a folder that holds a trained "
                       f"model.")
    is_adapter = (folder / "adapter_config.json").is_file()
    if _weight_files(folder) or ((folder / "config.json").is_file() and not is_adapter):
        _check_model_folder(folder)
        return Found(folder, "merged" if folder.name in MERGED_SUBDIRS else "full", tokenizer_dirs=(folder,))
    for name in MERGED_SUBDIRS:
        sub = folder / name
        if (sub / "config.json").is_file() and not _stale(sub, folder / "adapter_model.safetensors"):
            _check_model_folder(sub)
            return Found(sub, "merged", tokenizer_dirs=(sub, folder))
    if is_adapter:
        return _adapter(folder, model_path)
    raise RunError(_nothing_there(folder))


def _stale(merged: Path, adapter_weights: Path) -> bool:
    """A merged export older than the adapter beside it (trained again since): warn, and use the adapter."""
    weights = sorted(merged.glob("model*.safetensors"))
    if not weights or not adapter_weights.is_file():
        return False
    if min(p.stat().st_mtime for p in weights) >= adapter_weights.stat().st_mtime:
        return False
    from impruver.ui import print_warning

    print_warning(f"{merged} is older than {adapter_weights.name}: chatting with the adapter instead "
                  f"(run `impruver export` again to refresh the merged model)")
    return True


def _adapter(folder: Path, model_path: str | None) -> Found:
    config = _read_json(folder / "adapter_config.json")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        extra = " (adapter_model.bin is not loaded: impruver reads safetensors only)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise RunError(f"{folder} has adapter_config.json but no adapter_model.safetensors{extra}: the adapter is "
                       f"missing or still being written. {_train_hint(folder)}")
    _check_safetensors(weights)
    base = _adapter_base(folder, config, model_path)
    dirs = [folder] + ([Path(base)] if Path(base).is_dir() else [])
    kind = config.get("peft_type")
    return Found(folder, "adapter", base=base, adapter_type=kind if isinstance(kind, str) else None,
                 tokenizer_dirs=tuple(dirs))


def _adapter_base(folder: Path, config: dict[str, Any], model_path: str | None) -> str:
    """The adapter's base: adapter_config.json, then the run's plan.yaml, then the current plan's model.path."""
    candidates = [config.get("base_model_name_or_path"), _planned_model_path(folder), model_path]
    tried = [c for c in dict.fromkeys(candidates) if c]
    for candidate in tried:
        for path in (Path(candidate).expanduser(), folder / candidate):
            if (path / "config.json").is_file():
                _check_model_folder(path)
                return str(path)
    hub = [c for c in tried if not is_local(c)]
    if hub and not offline():
        return hub[0]  # transformers fetches it; a failure is reported where it is loaded
    if hub:
        raise hub_unreachable(hub[0], "model", "model.path")
    listed = ", ".join(tried) or "none named"
    raise RunError(f"{folder} holds an adapter, but its base model cannot be found (tried: {listed}). "
                   f"Set model.path=DIR to the base model folder the adapter was trained on.")


def _planned_model_path(folder: Path) -> str | None:
    """model.path from the run's own plan.yaml, written by the training job."""
    plan_file = RunLayout.of(folder).plan
    if not plan_file.is_file():
        return None
    try:
        data = yaml.safe_load(plan_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model.get("path") if isinstance(model, dict) else None


def _weight_files(folder: Path) -> list[Path]:
    """A full model's weight files (not an adapter's)."""
    return sorted(folder.glob("model*.safetensors")) + sorted(folder.glob("pytorch_model*.bin"))


def _check_model_folder(folder: Path) -> None:
    """A full model folder: config.json and complete safetensors weights (every shard of an index)."""
    if not (folder / "config.json").is_file():
        raise RunError(f"{folder} has weights but no config.json: the model was not saved completely. "
                       f"{_train_hint(folder)}")
    _read_json(folder / "config.json")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise RunError(f"{folder} is missing weight shards {', '.join(missing)} listed in {index.name}: the "
                           f"model is still being written or was copied partly. {_train_hint(folder)}")
        weights = [folder / s for s in shards]
    else:
        weights = sorted(folder.glob("model*.safetensors"))
    if not weights:
        if list(folder.glob("pytorch_model*.bin")):
            raise RunError(f"{folder} has only pytorch_model.bin weights, which impruver does not load (pickles "
                           f"can run code): save the model as safetensors. {_train_hint(folder)}")
        raise RunError(_nothing_there(folder))
    for path in weights:
        _check_safetensors(path)


def _check_safetensors(path: Path) -> None:
    """Raise when a safetensors file is truncated (still being written) or damaged, without loading it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > min(size - 8, MAX_HEADER_BYTES):
            raise RunError(f"{path} is empty or damaged ({size} bytes): it is still being written or the save "
                           f"was interrupted. {_train_hint(path.parent)}")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise RunError(f"{path} has a damaged header. {_train_hint(path.parent)}") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise RunError(f"{path} is truncated ({size} of {8 + length + end} bytes): it is still being written or "
                       f"the save was interrupted. {_train_hint(path.parent)}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"{path} cannot be read ({exc}): it is damaged or still being written. "
                       f"{_train_hint(path.parent)}") from None
    if not isinstance(data, dict):
        raise RunError(f"{path} should hold a JSON object. {_train_hint(path.parent)}")
    return data


def _nothing_there(folder: Path) -> str:
    head = (f"{folder} has no model to chat with: no model weights (config.json + model.safetensors), no peft "
            f"adapter (adapter_config.json + adapter_model.safetensors) and no merged export.")
    checkpoints = _checkpoints(folder)
    resume = f"`{_command('train', folder, 'train.resume=auto')}`"
    standalone = [p for p in checkpoints if (p / "config.json").is_file()]
    also = f", or chat with a checkpoint: `{_command('chat', folder, f'output_dir={standalone[-1]}')}`" \
        if standalone else ""
    state, who = _training_state(folder)
    if state == "running":
        return (f"{head} A training run is writing it now ({who}); the model is saved when it ends: chat then.")
    if state == "gone":
        what = f"resume it from its last checkpoint ({checkpoints[-1].name}) with {resume}" if checkpoints \
            else f"start it again with `{_command('train', folder)}`"
        return f"{head} The training run that held it ({who}) is no longer running: {what}{also}."
    if state == "recent":
        return (f"{head} A training run seems to be in progress ({who}); the model is saved when it ends: chat "
                f"then. If that run was stopped, resume it with {resume}{also}.")
    if checkpoints:
        names = ", ".join(p.name for p in checkpoints)
        return (f"{head} It holds checkpoints ({names}): the training run stopped before the end. "
                f"Finish it with {resume}{also}.")
    layout = RunLayout.of(folder)
    if layout.plan.is_file() or layout.data.is_dir():
        return (f"{head} It holds a plan (or composed data) but no trained model yet: run "
                f"`{_command('train', folder)}` and chat when it has finished.")
    return f"{head} {_train_hint(folder)}"


def _command(stage: str, folder: Path, *extra: str) -> str:
    """The command for ``stage`` on this run, as the running command line names it (its config file and
    overrides), so that it works as printed; ``output_dir=folder`` when impruver is used as a library."""
    from impruver.commands import command

    return command(stage, *extra, output_dir=str(folder))


# The lock a training run holds on its output_dir: JSON {"pid": int, "host": str, "started": ...}.
LOCK_FILE = ".lock"


def _training_state(folder: Path) -> tuple[str, str]:
    """Whether a training run is using ``folder``: ("running" | "gone" | "recent" | "", who or what says so).

    The run's lock decides when there is one: its pid alive on this host (or a lock of another host, which
    cannot be checked from here) is "running", a dead pid "gone". Without a lock, a training log written in
    the last 10 minutes is "recent" (perhaps running, perhaps killed).
    """
    import socket

    try:
        owner = json.loads((folder / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        owner = None
    if isinstance(owner, dict) and isinstance(owner.get("pid"), int):
        pid, host = owner["pid"], owner.get("host")
        who = f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
        if host and host != socket.gethostname():
            return "running", who
        return ("running" if _pid_alive(pid) else "gone"), who
    recent = _recently_written(folder)
    return ("recent", recent) if recent else ("", "")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def _checkpoints(folder: Path) -> list[Path]:
    """Training checkpoints, oldest first: impruver's checkpoints/step-N and Hugging Face's checkpoint-N."""
    found = [p for p in RunLayout.of(folder).checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.json").is_file()]
    found += [p for p in folder.glob("checkpoint-*") if p.is_dir()]
    return sorted(found, key=lambda p: int(re.sub(r"\D", "", p.name) or -1))


def _recently_written(folder: Path, within_s: float = 600) -> str:
    """'metrics.jsonl written 12 s ago' when the training log changed lately, else ''."""
    import time

    log_file = RunLayout.of(folder).metrics
    if not log_file.is_file():
        return ""
    age = time.time() - log_file.stat().st_mtime
    return f"{log_file.name} was written {age:.0f} s ago" if age < within_s else ""


def _train_hint(folder: Path) -> str:
    return (f"Train a model there with `{_command('train', folder)}` (an adapter can also be merged "
            f"into a standalone model with `{_command('export', folder)}`).")


# -- loading (torch) -------------------------------------------------------------------------------------------


def load(plan: Plan) -> Loaded:
    """Load the model and tokenizer that ``plan.output_dir`` holds, ready for generation.

    Args:
        plan: the validated :class:`~impruver.plan.Plan` of the command.

    Returns:
        The model in eval mode on the GPU when there is one (else the CPU), and its tokenizer with a chat template.

    Raises:
        RunError: the folder is missing or incomplete, or the model cannot be loaded.
    """
    found = locate(plan.output_dir, model_path=plan.model.path)
    tokenizer = load_tokenizer(found, plan)  # the cheaper, likelier failure first
    model = load_model(found, plan)
    context = context_length(model, plan)
    name = Path(plan.output_dir).expanduser().resolve().name or "impruver"
    return Loaded(model=model, tokenizer=tokenizer, found=found, context_length=context, name=name)


def load_tokenizer(found: Found, plan: Plan) -> Any:
    """The tokenizer saved with the model (the adapter's base as a fallback), with a chat template."""
    from transformers import AutoTokenizer

    folder = next((d for d in found.tokenizer_dirs if any((d / f).is_file() for f in TOKENIZER_FILES)), None)
    if folder is None:
        raise RunError(f"{found.folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): the training "
                       f"run saves it at the end, so it has not finished or was copied partly. "
                       f"{_train_hint(found.folder)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=plan.tokenizer.trust_remote_code)
    except Exception as exc:  # the library's many failure types all mean: this tokenizer cannot be used
        raise RunError(f"the tokenizer in {folder} cannot be loaded: {type(exc).__name__}: {exc}") from None
    if not tokenizer.chat_template:
        tokenizer.chat_template = _configured_template(plan, folder)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # generate() needs a pad id; padding is never used here
    return tokenizer


def _configured_template(plan: Plan, folder: Path) -> str:
    """The plan's tokenizer.chat_template (inline Jinja, a .jinja file or a registered name) for a bare tokenizer."""
    from impruver.data.templates import resolve_template
    from impruver.errors import ConfigError

    value = plan.tokenizer.chat_template
    try:  # the one resolver data composition uses too
        source = resolve_template(value) if value else ""
    except ConfigError:
        source = ""
    if not isinstance(source, str) or not source:
        raise RunError(f"the tokenizer in {folder} has no chat template and the plan gives none that can be used "
                       f"(tokenizer.chat_template={value!r}); set tokenizer.chat_template to a template name, a "
                       f".jinja file or Jinja source.")
    return source


def load_model(found: Found, plan: Plan) -> Any:
    """The full or merged model, or the base with the adapter applied, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _dtype(plan.model.dtype, device)
    trust = plan.model.trust_remote_code
    path = found.base if found.kind == "adapter" else str(found.folder)
    placement = {"device_map": device} if device == "cuda" else {}  # straight to the GPU, no copy in host memory
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust,
                                                     use_safetensors=True, **placement)
        if found.kind == "adapter":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(found.folder))
    except OSError as exc:
        if path and not is_local(path):
            raise hub_unreachable(path, "model", "model.path", exc) from None
        raise RunError(f"the model in {path} cannot be loaded: {exc}") from None
    except Exception as exc:  # shape mismatches, unknown architectures, peft version skew...
        raise RunError(f"the {found.kind} model in {found.folder} cannot be loaded: "
                       f"{type(exc).__name__}: {exc}") from None
    return model.to(device).eval()


def _dtype(name: str, device: str) -> Any:
    import torch

    if device == "cpu":
        return torch.float32  # half precision is slow (or unsupported) for generation on CPUs
    return {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def chat_settings(chat: ChatSpec, context: int) -> ChatSpec:
    """``plan.chat``, with replies capped at half the context when max_new_tokens would leave no room for a prompt.

    The default (256 new tokens) is the whole context of small models such as the demo's (256 positions).
    """
    if chat.max_new_tokens < context:
        return chat
    capped = max(1, context // 2)
    from impruver.ui import print_warning

    print_warning(f"chat.max_new_tokens={chat.max_new_tokens} would fill the model's whole context of {context} "
                  f"tokens; replies are capped at {capped} tokens (set chat.max_new_tokens below {context})")
    return chat.model_copy(update={"max_new_tokens": capped})


def context_length(model: Any, plan: Plan) -> int:
    """Tokens the model attends to: its config's position limit, else the plan's context length."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return plan.context_length


def quiet_libraries() -> None:
    """Keep library warnings (generation flags, hub notices) out of the conversation."""
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("peft", "torch", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # after importing transformers, which sets its own level once
    hf_logging.disable_progress_bar()  # "Loading weights" bars


def seed(value: int) -> None:
    """Seed torch's generator once per session, so a sampled conversation can be replayed."""
    import torch

    torch.manual_seed(value)
