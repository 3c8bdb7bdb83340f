"""The run folder: the one place that names what a run leaves in its ``output_dir``.

Data, training, chat, export and launch all find their files through :class:`RunLayout`, so a file's name is
spelled once::

    <output_dir>/
        plan.yaml                 the frozen plan of the last run (what workers and later stages read)
        data/train.jsonl          composed samples (ids + labels), data/val.jsonl, data/compose_report.json
        checkpoints/step-00000100 resumable training state
        metrics.jsonl loss.png run.json run_summary.json README.md eval.json
        base/                     an adapter's randomly initialised base, when it exists nowhere else
        merged/                   a LoRA adapter merged into its base (impruver export)
        gguf/                     <name>-<type>.gguf + <name>-<type>.Modelfile (impruver export --gguf)
        .lock                     held by the run that uses the folder now: pid, host, start time
        .plan.sha256              the hash of the plan.yaml the last run wrote (hand edits are noticed)

Work files of a run that died (``data/.compose-*``, ``checkpoints/.step-*.tmp``, ``.name.tmp<pid>``) match
:data:`WORK_GLOBS`; the next run that takes the lock removes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

OUTPUTS_ROOT = "outputs"  # where runs go by default (outputs/<preset>): a path under it is a run folder, never a Hub id
PLAN_FILE = "plan.yaml"
DATA_DIR = "data"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
RUN_FILE = "run.json"
RUN_SUMMARY = "run_summary.json"
EVAL_FILE = "eval.json"  # impruver.evaluate: exact-match accuracy on a question file
SWEEP_SUMMARY = "sweep_summary.json"
CARD_FILE = "README.md"
BASE_DIR = "base"
MERGED_DIR = "merged"
GGUF_DIR = "gguf"
MULTIRUN_DIR = "multirun"
LOCK_FILE = ".lock"
PLAN_HASH_FILE = ".plan.sha256"
# Temporary work of a run, relative to the run folder: a compose's work folder, a checkpoint being written, a file
# being written atomically (impruver.files), an export being assembled. Only a dead run leaves them behind.
WORK_GLOBS = (f"{DATA_DIR}/.compose-*", f"{DATA_DIR}/.*.tmp*", f"{CHECKPOINTS_DIR}/.*.tmp*", ".*.tmp*")


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder. Pure path arithmetic: nothing is created or read."""

    root: Path

    @classmethod
    def of(cls, output_dir: str | os.PathLike[str]) -> RunLayout:
        return cls(Path(output_dir))

    @property
    def plan(self) -> Path:
        return self.root / PLAN_FILE

    @property
    def data(self) -> Path:
        return self.root / DATA_DIR

    @property
    def train_data(self) -> Path:
        return self.data / "train.jsonl"

    @property
    def val_data(self) -> Path:
        return self.data / "val.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def checkpoint(self, step: int) -> Path:
        """The folder of the checkpoint after optimizer step ``step`` (zero-padded so names sort by step)."""
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step:08d}"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def loss_plot(self) -> Path:
        return self.root / LOSS_PLOT

    @property
    def run_record(self) -> Path:
        return self.root / RUN_FILE

    @property
    def run_summary(self) -> Path:
        return self.root / RUN_SUMMARY

    @property
    def eval_report(self) -> Path:
        return self.root / EVAL_FILE

    @property
    def card(self) -> Path:
        return self.root / CARD_FILE

    @property
    def base(self) -> Path:
        return self.root / BASE_DIR

    @property
    def merged(self) -> Path:
        return self.root / MERGED_DIR

    @property
    def gguf(self) -> Path:
        return self.root / GGUF_DIR

    @property
    def multirun(self) -> Path:
        return self.root / MULTIRUN_DIR

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def plan_hash(self) -> Path:
        return self.root / PLAN_HASH_FILE

    def stale_work(self) -> list[Path]:
        """Work files and folders left in this run folder by runs that ended before cleaning up."""
        return sorted({p for pattern in WORK_GLOBS for p in self.root.glob(pattern)})


__all__ = ["RunLayout", "OUTPUTS_ROOT", "PLAN_FILE", "CHECKPOINTS_DIR", "CHECKPOINT_PREFIX", "METRICS_FILE", "RUN_SUMMARY",
           "EVAL_FILE", "SWEEP_SUMMARY", "BASE_DIR", "MERGED_DIR", "LOCK_FILE", "PLAN_HASH_FILE", "WORK_GLOBS"]
