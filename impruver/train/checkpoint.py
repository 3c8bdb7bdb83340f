"""Checkpoints for resuming: weights, optimizer, schedule, RNG and the loop's position.

A checkpoint is ``<output_dir>/checkpoints/step-00000100/`` (see :class:`impruver.layout.RunLayout`) holding

* the weights and optimizer state, as the distribution strategy saves them: ``trainable.safetensors`` (every
  parameter that trains) and ``optimizer.pt`` for a replicated run; accelerate's sharded state
  (``pytorch_model_fsdp_0/``, ``optimizer_0/``, one shard file per rank) for FSDP / DeepSpeed;
* ``scheduler.pt``: the learning-rate schedule; ``rng_<rank>.pt``: every rank's random generators (dropout);
* ``state.json``: the optimizer step, tokens seen, elapsed time, the eval loss at that step.

Every rank writes into one temporary folder which the main process renames into place once all have finished
and ``state.json`` is written, so a crash never leaves half a checkpoint (only folders with a state.json count).
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
from impruver.layout import CHECKPOINT_PREFIX, RunLayout

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
    return RunLayout.of(output_dir).checkpoint(step)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a state.json), oldest first."""
    root = RunLayout.of(output_dir).checkpoints
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to continue from: ``never`` -> None, ``auto`` -> the latest (None if none), or a folder."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    folder = Path(resume)
    if not (folder / STATE_FILE).is_file():
        raise RunError(f"train.resume: {folder} is not a checkpoint (no state.json); use train.resume=auto")
    return folder


def save_checkpoint(output_dir: str | Path, *, strategy: Any, accelerator: Any, model: Any, optimizer: Any,
                    scheduler: Any, state: TrainState) -> Path:
    """Write the checkpoint of ``state.step``; every rank calls this. Returns its folder.

    ``model`` and ``optimizer`` are the prepared ones: the strategy decides what of them is written and by whom.
    """
    import torch

    final = checkpoint_dir(output_dir, state.step)
    tmp = final.with_name(f".{final.name}.tmp")  # one name for every rank: all write their part into it
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    strategy.save_state(accelerator, tmp, model=model, optimizer=optimizer)
    torch.save(_rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()  # every shard is on disk before the checkpoint counts
    if main:
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(folder: Path, *, strategy: Any, accelerator: Any, model: Any, optimizer: Any,
                    scheduler: Any) -> TrainState:
    """Restore a checkpoint into the prepared model, optimizer, schedule and this rank's RNG; return its state."""
    import torch

    strategy.load_state(accelerator, folder, model=model, optimizer=optimizer)
    scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=True))
    rng = folder / f"rng_{accelerator.process_index}.pt"
    _set_rng_state(torch.load(rng if rng.is_file() else folder / "rng.pt", weights_only=True))
    return TrainState(**json.loads((folder / STATE_FILE).read_text(encoding="utf-8")))


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
