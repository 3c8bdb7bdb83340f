"""Training metrics: metrics.jsonl always, a progress bar in a terminal (plain log lines otherwise),
wandb / tensorboard when ``train.report_to`` asks (each imported only then), and the loss-curve PNG.

Only the main process writes; the others get a writer whose methods do nothing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from impruver.errors import RunError
from impruver.layout import RunLayout

log = logging.getLogger("impruver")


def check_reporters(report_to: list[str]) -> None:
    """Fail before training when a requested reporter's package is missing."""
    packages = {"wandb": "wandb", "tensorboard": "tensorboard"}
    for name in report_to:
        if importlib.util.find_spec(packages[name]) is None:
            raise RunError(f"train.report_to: {name} is not installed here (pip install {packages[name]}), "
                           f"or drop it from train.report_to")


class MetricsWriter:
    """Appends one JSON object per event to metrics.jsonl and forwards numbers to the reporters."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, report_to: list[str], resume_step: int,
                 run_name: str, config: dict[str, Any]) -> None:
        self.enabled = enabled
        self.path = RunLayout.of(output_dir).metrics
        self._wandb: Any = None
        self._tb: Any = None
        if not enabled:
            return
        _truncate_after(self.path, resume_step)
        if "wandb" in report_to:
            import wandb

            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "impruver"), name=run_name,
                                     dir=str(output_dir), config=config, resume="allow")
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "event")}
        step = record.get("step")
        if self._wandb is not None and step is not None:
            self._wandb.log(numbers, step=step)
        if self._tb is not None and step is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _truncate_after(path: Path, step: int) -> None:
    """Drop records past ``step`` (a resumed run rewrites them), or all of a fresh run's old file."""
    if not path.is_file():
        return
    if step <= 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(output_dir: str | Path) -> Path | None:
    """loss.png from metrics.jsonl (train and eval loss by step); None, with a log line, without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        log.info("matplotlib is not installed: no loss curve (pip install matplotlib)")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(RunLayout.of(output_dir).metrics)
    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    target = RunLayout.of(output_dir).loss_plot
    tmp = target.with_name(".loss.tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, target)
    return target


def format_line(record: dict[str, Any], total_steps: int) -> str:
    """A plain log line for a train record."""
    extra = "".join(f"  {label} {record[key]:.3f}" for key, label in PREFERENCE_LINE if key in record)
    return (f"step {record['step']}/{total_steps}  loss {record['loss']:.4f}{extra}  lr {record['lr']:.2e}  "
            f"{record['tokens_per_s']:,.0f} tok/s  eta {_eta(record.get('eta_s'))}")


# A preference objective's metrics shown on the progress line when a train record has them (impruver.objectives).
PREFERENCE_LINE = (("rewards/accuracy", "acc"), ("rewards/margin", "margin"))


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
