"""Checkpoints for resuming: weights, optimizer, schedule, RNG and the loop's position.

A checkpoint is ``<output_dir>/checkpoints/step-00000100/`` (see :class:`impruver.layout.RunLayout`) holding

* the weights and optimizer state, as the distribution strategy saves them: ``trainable.safetensors`` (every
  parameter that trains) and ``optimizer.pt`` for a replicated run; accelerate's sharded state
  (``pytorch_model_fsdp_0/``, ``optimizer_0/``, one shard file per rank) for FSDP / DeepSpeed;
* ``scheduler.pt``: the learning-rate schedule; ``rng_<rank>.pt``: every rank's random generators (dropout);
* ``state.json``: the optimizer step, tokens seen, elapsed time, the eval loss at that step, the logging window
  so far, and the size of every file above (a truncated or missing file is found before anything loads);
* ``plan.yaml``: the plan that trained up to this step, which a resume compares with its own (:func:`plan_changes`).

Every rank writes into one temporary folder which the main process renames into place once all have finished
and ``state.json`` is written, so a crash never leaves half a checkpoint (only folders with a state.json count).
The data order depends only on (seed, epoch, index), so the step count is all the loop needs to continue.

A resume is honest about what changed: settings that change the optimisation (the learning rate, the schedule,
batch sizes, the data, the model, the method, ...) are refused with the list of differences unless the plan names
them in ``train.resume_changes``; then they apply from the checkpoint's step and the run records them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from impruver.errors import RunError
from impruver.layout import CHECKPOINT_PREFIX, PLAN_FILE, RunLayout
from impruver.plan.io import flatten

log = logging.getLogger("impruver")
STATE_FILE = "state.json"
SCHEDULER_FILE = "scheduler.pt"


@dataclass
class TrainState:
    """Where the loop is; saved in every checkpoint's state.json."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # useful (non-padding) tokens trained on, all ranks
    elapsed_s: float = 0.0  # training time before this process started (resumed runs)
    eval_loss: float | None = None  # at this step, when evaluated
    best_step: int | None = None
    best_eval_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # eval results so far
    signature: dict[str, Any] = field(default_factory=dict)  # what fixes the data order (see plan_changes)
    # The logging window open at this step: summed loss over all ranks, target and real tokens, seconds. A resume
    # continues it, so the first loss logged after a resume covers the same steps as in an uninterrupted run.
    window: dict[str, float] = field(default_factory=dict)
    # Each resume of this run: {"step", "from", "changes": {key: [old, new]}} (the changes the plan asked for).
    resumes: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)  # bytes of every file of the checkpoint (state.json only)


# Plan keys (and sections) that do not change the optimisation: a resume applies their new values silently.
# Everything else (train.lr, the schedule, batch sizes, data, model, method, precision, ...) must be named in
# train.resume_changes to change on a resume.
UNCHANGING = ("version", "preset", "choices", "output_dir", "train_path", "val_path", "memory", "chat", "eval",
              "train.logging_steps", "train.eval_steps", "train.save_steps", "train.save_total_limit",
              "train.load_best_at_end", "train.resume", "train.resume_changes", "train.report_to", "train.num_workers",
              "train.memory_check", "train.compile", "train.gradient_checkpointing", "hardware.name",
              "hardware.gpu_memory_gib", "hardware.main_process_ip", "hardware.main_process_port",
              "hardware.machine_rank", "hardware.device", "hardware.backend", "model.attn_implementation",
              "train.ddp", "dataset.num_proc")
# The data-order signature's entries: the plan key that names each, then the plan keys (or sections) whose change
# explains a change of it (a changed train.epochs changes total_steps: listed once, as train.epochs).
SIGNATURE_KEYS: dict[str, tuple[str, ...]] = {
    "seed": ("train.seed",),
    "batch_size": ("train.batch_size",),
    "grad_accum": ("train.grad_accum",),
    "world_size": ("hardware.num_processes", "hardware.num_machines"),
    "seq_len": ("train.max_seq_len", "dataset.max_tokens", "model.context_length", "model.arch.n_positions"),
    "packing": ("train.packing",),
    "rows": ("dataset", "tokenizer", "model", "train.max_seq_len", "train.packing"),
    "total_steps": ("train.max_steps", "train.epochs", "train.batch_size", "train.grad_accum", "hardware", "dataset",
                    "tokenizer", "model", "train.max_seq_len", "train.packing"),
}


class DamagedCheckpoint(RunError):
    """A checkpoint with a missing, truncated or unreadable file (the message names it)."""


def signature_changes(saved: dict[str, Any], current: dict[str, Any],
                      explained: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """The data-order settings that differ, by the plan key that changes them: {key: (old, new)}.

    A derived entry is shown with its own name (``dataset (rows)``: a dataset whose composed rows changed). One
    that a key in ``explained`` (the plan keys found changed) accounts for is left out: it is listed by that key.
    """
    changed: dict[str, tuple[Any, Any]] = {}
    for name, old in saved.items():
        new = current.get(name)
        keys = SIGNATURE_KEYS.get(name, (name,))
        if old != new and not any(_within(key, keys) for key in explained):
            changed[keys[0] if keys[0].endswith(name) else f"{keys[0]} ({name})"] = (old, new)
    return changed


def plan_changes(folder: Path, plan: Any, signature: dict[str, Any], saved_signature: dict[str, Any]
                 ) -> dict[str, tuple[Any, Any]]:
    """What this plan changes in the optimisation of the run saved in ``folder``: {key: (old, new)}.

    The whole plans are compared, key by key (settings in :data:`UNCHANGING` excepted), plus the data-order
    signature (which sees a changed dataset as a different number of rows). A checkpoint written before plans
    were saved in checkpoints is compared by its signature alone, with a warning.
    """
    import yaml

    saved_plan = folder / PLAN_FILE
    if not saved_plan.is_file():
        log.warning("%s holds no plan.yaml (an older impruver): only the data-order settings are compared", folder)
        return signature_changes(saved_signature, signature)
    try:
        old = flatten(yaml.safe_load(saved_plan.read_text(encoding="utf-8")) or {})
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DamagedCheckpoint(f"{saved_plan} is damaged ({type(exc).__name__})") from None
    new = flatten(plan.to_dict())
    changes = {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
               if old.get(key) != new.get(key) and not _within(key, UNCHANGING)}
    return {**changes, **signature_changes(saved_signature, signature, explained=tuple(changes))}


def refusal(folder: Path, changes: dict[str, tuple[Any, Any]], allowed: tuple[str, ...] = ()) -> str:
    """Why a resume is refused, each difference by key (old -> new), and the override that accepts them."""
    refused = {k: v for k, v in changes.items() if not _within(k.split(" ")[0], allowed)}
    listed = "\n".join(f"  - {key}: {_show(old)} -> {_show(new)}" for key, (old, new) in refused.items())
    keys = ",".join(dict.fromkeys(k.split(" ")[0] for k in refused))
    return (f"train.resume: {folder} was trained with other settings that change the optimisation:\n{listed}\n"
            f"To apply the new values from that step, name them: train.resume_changes=[{keys}]\n"
            "Otherwise restore them, or start over with train.resume=never.")


def accepted_changes(folder: Path, changes: dict[str, tuple[Any, Any]], allowed: list[str]
                     ) -> dict[str, tuple[Any, Any]]:
    """The changes ``train.resume_changes`` names (a key or a whole section); any other refuses the resume.

    Raises:
        RunError: some change is not named (the message lists them and the override that names them).
    """
    prefixes = tuple(allowed)
    if any(not _within(key.split(" ")[0], prefixes) for key in changes):
        raise RunError(refusal(folder, changes, prefixes))
    unused = [p for p in prefixes if not any(_within(k.split(" ")[0], (p,)) for k in changes)]
    if unused:
        log.warning("train.resume_changes names %s, which did not change", ", ".join(unused))
    return changes


def _within(key: str, prefixes: tuple[str, ...]) -> bool:
    """``key`` is one of ``prefixes`` or inside one of them (``train.lr`` is within ``train``)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)



def _show(value: Any) -> str:
    return "(unset)" if value is None else str(value)


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return RunLayout.of(output_dir).checkpoint(step)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a state.json), oldest first."""
    root = RunLayout.of(output_dir).checkpoints
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resume_candidates(resume: str, output_dir: str | Path) -> list[Path]:
    """Checkpoints to try, best first: ``auto`` -> every one, newest first (a damaged one falls back to the one
    before); a folder -> that one only; ``never`` -> none."""
    if resume == "never":
        return []
    if resume == "auto":
        return list(reversed(list_checkpoints(output_dir)))
    folder = Path(resume)
    if not (folder / STATE_FILE).is_file():
        raise RunError(f"train.resume: {folder} is not a checkpoint (no state.json); use train.resume=auto")
    return [folder]


def read_state(folder: Path) -> TrainState:
    """The checkpoint's state.json, after checking every file it lists is there whole (nothing is loaded).

    Raises:
        DamagedCheckpoint: naming the unreadable, missing or truncated file.
    """
    path = folder / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        state = TrainState(**data)
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise DamagedCheckpoint(f"{path} is damaged ({type(exc).__name__}: {exc})") from None
    for name, size in state.files.items():
        file = folder / name
        if not file.is_file():
            raise DamagedCheckpoint(f"{file} is missing")
        if file.stat().st_size != size:
            raise DamagedCheckpoint(f"{file} is truncated ({file.stat().st_size} of {size} bytes)")
    state.files = {}
    return state


def save_checkpoint(output_dir: str | Path, *, strategy: Any, accelerator: Any, model: Any, optimizer: Any,
                    scheduler: Any, state: TrainState, plan_text: str | None = None) -> Path:
    """Write the checkpoint of ``state.step``; every rank calls this. Returns its folder.

    ``model`` and ``optimizer`` are the prepared ones: the strategy decides what of them is written and by whom.
    ``plan_text`` (the plan as YAML) is saved beside them for the next resume to compare with.
    """
    final = checkpoint_dir(output_dir, state.step)
    tmp = final.with_name(f".{final.name}.tmp")  # one name for every rank: all write their part into it
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        _write_parts(tmp, final, strategy=strategy, accelerator=accelerator, model=model, optimizer=optimizer,
                     scheduler=scheduler, state=state, plan_text=plan_text)
    except BaseException:
        if main:  # a full disk (or Ctrl+C) while saving leaves no half checkpoint behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


def _write_parts(tmp: Path, final: Path, *, strategy: Any, accelerator: Any, model: Any, optimizer: Any,
                 scheduler: Any, state: TrainState, plan_text: str | None) -> None:
    import torch

    main = accelerator.is_main_process
    strategy.save_state(accelerator, tmp, model=model, optimizer=optimizer)
    torch.save(_rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()  # every shard is on disk before the checkpoint counts
    if main:
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        if plan_text is not None:
            (tmp / PLAN_FILE).write_text(plan_text, encoding="utf-8")
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / STATE_FILE).write_text(json.dumps(asdict(replace(state, files=files)), indent=1), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


def load_checkpoint(folder: Path, *, strategy: Any, accelerator: Any, model: Any, optimizer: Any,
                    scheduler: Any) -> TrainState:
    """Restore a checkpoint into the prepared model, optimizer, schedule and this rank's RNG; return its state.

    Raises:
        DamagedCheckpoint: a file is missing, truncated or does not load (the message names the checkpoint and
            the reason). Loading may have changed part of the model before it failed: the caller loads another
            checkpoint, which overwrites every part, or stops.
    """
    import torch

    state = read_state(folder)
    try:
        strategy.load_state(accelerator, folder, model=model, optimizer=optimizer)
        scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=True))
        rng = folder / f"rng_{accelerator.process_index}.pt"
        _set_rng_state(torch.load(rng if rng.is_file() else folder / "rng.pt", weights_only=True))
    except Exception as exc:  # any file of a checkpoint that does not load makes it unusable, whatever the cause
        raise DamagedCheckpoint(f"{folder} does not load ({type(exc).__name__}: {_first_line(exc)})") from None
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def rotate(output_dir: str | Path, *, keep: int, best_step: int | None) -> None:
    """Delete old checkpoints, keeping the ``keep`` most recent plus the best one."""
    found = list_checkpoints(output_dir)
    keep_names = {p.name for p in found[-keep:]}
    if best_step is not None:
        keep_names.add(checkpoint_dir(output_dir, best_step).name)
    for folder in found:
        if folder.name not in keep_names:
            shutil.rmtree(folder, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
