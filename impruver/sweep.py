"""The summary of a Hydra multirun sweep: a rich table and ``sweep_summary.json`` in the sweep folder.

Each job writes ``run_summary.json`` (its overrides and results) into its own output folder; this callback reads
them when the sweep ends. Reading files rather than in-memory returns works with every launcher: jobs run in
this process (basic), in a process pool (joblib) or on other machines (submitit / SLURM).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

RUN_SUMMARY = "run_summary.json"
SWEEP_SUMMARY = "sweep_summary.json"
# Keys of the training summary (impruver.train.recipe.run) shown per run; eval_loss is the kept model's.
COLUMNS = ("steps", "train_loss", "eval_loss", "tokens_per_s", "elapsed_s")


def collect(sweep_dir: Path) -> dict[str, Any]:
    """Gather the jobs' run summaries under ``sweep_dir``, best (lowest eval loss) marked."""
    runs = []
    for path in sorted(sweep_dir.glob(f"*/{RUN_SUMMARY}"), key=lambda p: _job_number(p.parent.name)):
        record = json.loads(path.read_text(encoding="utf-8"))
        record["output_dir"] = str(path.parent)
        runs.append(record)
    scored = [r for r in runs if _finite(r.get("eval_loss"))]
    best = min(scored, key=lambda r: r["eval_loss"]) if scored else None
    for r in runs:
        r["best"] = r is best
    return {"sweep_dir": str(sweep_dir), "jobs": len(runs), "best": best["output_dir"] if best else None,
            "runs": runs}


def write_summary(sweep_dir: Path) -> dict[str, Any]:
    from impruver.files import atomic_write_text

    summary = collect(sweep_dir)
    atomic_write_text(sweep_dir / SWEEP_SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def render(summary: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"sweep: {summary['jobs']} runs in {summary['sweep_dir']}", title_justify="left")
    table.add_column("", style="green")
    table.add_column("overrides", style="cyan")
    for col in COLUMNS:
        table.add_column(col.replace("_", " "), justify="right")
    # Show what varies between runs; what every run shares goes into the title.
    shared = set.intersection(*(set(r.get("overrides", [])) for r in summary["runs"])) if summary["runs"] else set()
    if shared:
        table.title += f"  (all: {' '.join(sorted(shared))})"
    for run in summary["runs"]:
        cells = [_fmt(run.get(c)) for c in COLUMNS]
        varying = [o for o in run.get("overrides", []) if o not in shared]
        table.add_row("best" if run["best"] else "", " ".join(varying), *cells)
    return table


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, summarise its jobs."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from impruver.ui import console

        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        summary = write_summary(sweep_dir)
        console.print(render(summary))
        console.print(f"summary written to {sweep_dir / SWEEP_SUMMARY}", markup=False)


def _job_number(name: str) -> int:
    head = name.split("_", 1)[0]
    return int(head) if head.isdigit() else 1 << 30


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
