"""The summary of one multirun sweep: a rich table and ``sweep_summary.json`` in that sweep's own folder.

Each job writes ``run_summary.json`` (its overrides and results) into its own output folder below the sweep's
folder; the command line reads them when ``hydra.main`` returns. Every sweep gets a folder of its own
(``<output_dir>/multirun/<time>``), so the summary holds exactly that sweep's jobs, never an older sweep's.
Reading files rather than in-memory returns works with every launcher: jobs run in this process (basic), in a
process pool (joblib) or on other machines (submitit / SLURM).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from impruver.layout import RUN_SUMMARY, SWEEP_SUMMARY

# Keys of the training summary (impruver.train.recipe) shown per run; eval_loss is the kept model's.
COLUMNS = ("steps", "train_loss", "eval_loss", "tokens_per_s", "elapsed_s")
HEADERS = {"steps": "steps", "train_loss": "train", "eval_loss": "eval", "tokens_per_s": "tok/s",
           "elapsed_s": "s"}


def collect(sweep_dir: Path) -> dict[str, Any]:
    """Gather the run summaries of the jobs in ``sweep_dir`` (one level down), the best (lowest objective) marked.

    The objective is the eval loss, or the train loss for runs without an eval, as the sweeper saw it.
    """
    runs = []
    for path in sorted(sweep_dir.glob(f"*/{RUN_SUMMARY}"), key=lambda p: _job_number(p.parent.name)):
        record = json.loads(path.read_text(encoding="utf-8"))
        record["output_dir"] = str(path.parent)
        runs.append(record)
    scored = [r for r in runs if _finite(_objective(r))]
    best = min(scored, key=_objective) if scored else None
    for r in runs:
        r["best"] = r is best
    return {"sweep_dir": str(sweep_dir), "jobs": len(runs), "best": best["output_dir"] if best else None,
            "runs": runs}


def write_summary(sweep_dir: Path) -> dict[str, Any]:
    from impruver.files import atomic_write_text

    summary = collect(sweep_dir)
    atomic_write_text(sweep_dir / SWEEP_SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def varying(runs: list[dict[str, Any]]) -> list[str]:
    """Per run, the overrides whose value differs between runs, keys shortened to their last part (lr=3e-3).

    What every run shares goes into the table's title instead; a shortened key that would be ambiguous
    (``train.seed`` and ``dataset.seed``) keeps its full path.
    """
    values = [dict(_key_value(o) for o in r.get("overrides", [])) for r in runs]
    keys = list(dict.fromkeys(k for v in values for k in v))  # in the order the command line gave them
    differing = [k for k in keys if len({v.get(k) for v in values}) > 1]
    leaves = [k.rpartition(".")[2] for k in differing]
    short = {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(differing, leaves)}
    return [" ".join(f"{short[k]}={_short_value(v[k])}" for k in differing if k in v) for v in values]


def shared(runs: list[dict[str, Any]]) -> list[str]:
    """The overrides every run has in common (shown once, in the title)."""
    if not runs:
        return []
    common = set.intersection(*(set(r.get("overrides", [])) for r in runs))
    # `~key=null` is half of a replacing override (`~dataset.sources` then `+dataset.sources=...`): not news.
    return sorted(o for o in common if not o.startswith("~"))


def render(summary: dict[str, Any]) -> Any:
    from rich.table import Table

    runs = summary["runs"]
    title = f"sweep: {summary['jobs']} runs in {summary['sweep_dir']}"
    common = " ".join(shared(runs))
    table = Table(title=title, title_justify="left", caption=f"all runs: {common}" if common else None,
                  caption_justify="left")
    table.add_column("", style="green", no_wrap=True)
    table.add_column("overrides", style="cyan", overflow="fold")
    for col in COLUMNS:
        table.add_column(HEADERS[col], justify="right", no_wrap=True)
    for run, cell in zip(runs, varying(runs)):
        mark = "best" if run["best"] else ("failed" if run.get("exit_code") else "")
        table.add_row(mark, cell, *(_fmt(run.get(c)) for c in COLUMNS))
    return table


def _short_value(value: str) -> str:
    """A float as 4 significant digits (an optuna trial's lr=0.0024269323663679908 reads lr=0.002427)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if "." not in value and "e" not in value.lower() else f"{number:.4g}"


def _key_value(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _objective(run: dict[str, Any]) -> float | None:
    value = run.get("eval_loss")
    return value if _finite(value) else run.get("train_loss")


def _job_number(name: str) -> int:
    head = name.split("_", 1)[0]
    return int(head) if head.isdigit() else 1 << 30


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


__all__ = ["COLUMNS", "collect", "render", "shared", "varying", "write_summary"]
