"""Checkpoints for resuming: trainable weights, optimizer, schedule, RNG and the loop's position.

A checkpoint is ``<output_dir>/checkpoints/step-00000100/`` holding

* ``trainable.safetensors``: every parameter that trains (the whole model, or only the adapters);
* ``optimizer.pt`` / ``scheduler.pt`` / ``rng.pt``: torch state dicts (tensors and numbers only, read back with
  ``weights_only=True``);
* ``state.json``: the optimizer step, tokens seen, elapsed time, the eval loss at that step.

It is written into a temporary folder and renamed into place, so a crash never leaves half a checkpoint.
The data order depends only on (seed, epoch, index), so the step count is all the loop needs to continue.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from impruver.errors import RunError

log = logging.getLogger("impruver")
CHECKPOINTS = "checkpoints"
PREFIX = "step-"


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
    signature: dict[str, Any] = field(default_factory=dict)  # what fixes the data order (see check_signature)


def check_signature(saved: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    """A resumed run must see the same batches: the settings that decide the data order must not change.

    Raises:
        RunError: naming each setting that differs, with both values.
    """
    changed = [f"{key}: {saved[key]} -> {current.get(key)}" for key in saved
               if key != "total_steps" and saved[key] != current.get(key)]
    if changed:
        raise RunError(f"train.resume: {folder} was written with other settings that decide the data order "
                       f"({'; '.join(changed)}); restore them, or start over with train.resume=never")
    if saved.get("total_steps") not in (None, current.get("total_steps")):
        log.warning("resuming with %s total steps instead of %s: the learning-rate schedule is stretched to "
                    "the new length", current.get("total_steps"), saved["total_steps"])


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"{PREFIX}{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a state.json), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to continue from: ``never`` -> None, ``auto`` -> the latest (None if none), or a folder."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    folder = Path(resume)
    if not (folder / "state.json").is_file():
        raise RunError(f"train.resume: {folder} is not a checkpoint (no state.json); use train.resume=auto")
    return folder


def trainable_state(model: Any) -> dict[str, Any]:
    """The parameters that train, by name, detached on the CPU (contiguous, as safetensors wants)."""
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output_dir: str | Path, *, model: Any, optimizer: Any, scheduler: Any,
                    state: TrainState) -> Path:
    """Write a checkpoint of ``model`` (the unwrapped module) at ``state.step``; return its folder."""
    import torch
    from safetensors.torch import save_file

    final = checkpoint_dir(output_dir, state.step)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_checkpoint(folder: Path, *, model: Any, optimizer: Any | None = None, scheduler: Any | None = None,
                    rng: bool = True) -> TrainState:
    """Restore a checkpoint into ``model`` (and the optimizer, schedule and RNG when given); return its state."""
    load_trainable(folder, model)
    import torch

    if optimizer is not None:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    if rng:
        _set_rng_state(torch.load(folder / "rng.pt", weights_only=True))
    return TrainState(**json.loads((folder / "state.json").read_text(encoding="utf-8")))


def load_trainable(folder: Path, model: Any) -> None:
    """Copy the saved trainable weights into ``model``; every trainable parameter must be in the file."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    unknown = [n for n in saved if n not in params]
    if missing or unknown:
        raise RunError(f"train.resume: {folder} does not match this model (missing {missing[:3]}, unexpected "
                       f"{unknown[:3]}); was it written by another model or method? use train.resume=never")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value.to(params[name].dtype))


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
