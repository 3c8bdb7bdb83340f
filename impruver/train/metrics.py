"""Training metrics: metrics.jsonl always, a progress bar in a terminal (plain log lines otherwise), the loss-curve
PNG, and every tracker accelerate supports when ``train.report_to`` names it (wandb, tensorboard, mlflow, trackio,
aim, comet_ml, clearml, dvclive, swanlab: accelerate's own list, read from the installed version).

The trackers go through accelerate's tracker API: the recipe builds its ``Accelerator(log_with=...)``, the writer
calls ``init_trackers`` with the plan (secrets redacted) and ``accelerator.log`` with the same records that go to
metrics.jsonl; ``accelerator.end_training()`` closes them. Only the main process writes; the others get a writer
whose methods do nothing.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from impruver.errors import Problem, RunError
from impruver.layout import RunLayout

log = logging.getLogger("impruver")

# The module a tracker needs, where it is not the tracker's own name (accelerate's is_*_available checks).
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX")}
TRACKERS_DIR = "trackers"  # <output_dir>/trackers/<project>: file-based trackers' logs (tensorboard events, ...)


@functools.cache
def tracker_names() -> tuple[str, ...]:
    """The trackers the installed accelerate supports: the keys of ``accelerate.tracking.LOGGER_TYPE_TO_CLASS``.

    Read from accelerate's source rather than imported: importing accelerate imports torch, and planning does not.
    """
    spec = importlib.util.find_spec("accelerate")
    if spec is None or not spec.submodule_search_locations:
        return ()
    source = Path(next(iter(spec.submodule_search_locations))) / "tracking.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        tree = None
    for node in ast.walk(tree) if tree is not None else ():
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(getattr(t, "id", None) == "LOGGER_TYPE_TO_CLASS" for t in node.targets)):
            return tuple(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS  # a layout this parser does not know: ask it

    return tuple(LOGGER_TYPE_TO_CLASS)


def tracker_problems(report_to: list[str]) -> list[Problem]:
    """A problem per requested tracker whose package is not installed (all of them at once)."""
    problems = []
    for name in report_to:
        modules = TRACKER_MODULES.get(name, (name,))
        if all(importlib.util.find_spec(m) is None for m in modules):
            problems.append(Problem("train.report_to", f"{name} is not installed here (pip install {modules[0]}), "
                                    f"or drop it from train.report_to"))
    return problems


def check_reporters(report_to: list[str]) -> None:
    """Fail before training when a requested tracker's package is missing."""
    problems = tracker_problems(report_to)
    if problems:
        raise RunError("\n".join(str(p) for p in problems))


def accelerator_options(output_dir: str | Path, report_to: list[str]) -> dict[str, Any]:
    """What ``Accelerator(...)`` needs for the plan's trackers: ``log_with`` and where file-based ones write."""
    if not report_to:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": list(report_to),
            "project_config": ProjectConfiguration(project_dir=str(output_dir),
                                                   logging_dir=str(Path(output_dir) / TRACKERS_DIR))}


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``: every tracker takes flat scalars (tensorboard's
    hparams take nothing else); lists and None become text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


class MetricsWriter:
    """Appends one JSON object per event to metrics.jsonl and logs its numbers to the accelerator's trackers."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, report_to: list[str], resume_step: int,
                 run_name: str, config: dict[str, Any], accelerator: Any = None) -> None:
        self.enabled = enabled
        self.path = RunLayout.of(output_dir).metrics
        self._accelerator = accelerator if report_to else None
        if not enabled:
            return
        _truncate_after(self.path, resume_step)
        if self._accelerator is not None:
            project = os.environ.get("WANDB_PROJECT", "impruver")
            self._accelerator.init_trackers(project, config=flat_config(config), init_kwargs={
                "wandb": {"name": run_name, "dir": str(output_dir), "resume": "allow"}})

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        numbers = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "event")}
        step = record.get("step")
        if self._accelerator is not None and step is not None and numbers:
            event = record.get("event", "train")
            self._accelerator.log({f"{event}/{k}": v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        """The trackers are closed by ``accelerator.end_training()`` at the end of the run."""


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
