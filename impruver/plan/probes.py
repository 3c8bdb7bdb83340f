"""Machine probes: what this machine lacks to run a plan, found without importing torch.

Components say what they need (``requires``: importable module names, e.g. a method's or an optimizer's
``("bitsandbytes",)``, a strategy's ``("deepspeed",)``); this module only looks whether it is installed, and
whether a CUDA driver is visible for a GPU hardware profile, and which of the plan's Hugging Face Hub ids this
machine can neither find in its cache nor fetch (one short probe, see :mod:`impruver.hub`). ``impruver plan`` shows
these as warnings; a run refuses to start, before composing anything.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from impruver import registry
from impruver.errors import ConfigError, Problem

if TYPE_CHECKING:
    from impruver.hub import HubRef
    from impruver.plan.schema import Plan


def environment_problems(plan: Plan) -> list[Problem]:
    """What this machine lacks to run the plan (no torch import): warnings for `impruver plan`, errors for a run."""
    from impruver.components import method_of
    from impruver.strategies import strategy_of

    problems = []
    parts: list[tuple[str, str, Any]] = [
        ("method", f"method={plan.method.builder}", method_of(plan)),
        ("train.optimizer", f"train.optimizer={plan.train.optimizer}",
         registry.lookup("optimizers", plan.train.optimizer)),
        ("hardware.distributed", f"hardware.distributed={plan.hardware.distributed}", strategy_of(plan)),
    ]
    for key, setting, component in parts:
        missing = [m for m in getattr(component, "requires", ()) if importlib.util.find_spec(m) is None]
        if missing:
            problems.append(Problem(key, f"{setting} needs {', '.join(missing)}, which is not installed here "
                                    f"(pip install {' '.join(missing)}); choose another {key.split('.')[-1]} to run "
                                    f"on this machine ({', '.join(registry.names(_kind(key)))})"))
    if plan.hardware.device == "cuda" and not has_nvidia_driver():
        problems.append(Problem("hardware", f"profile '{plan.hardware.name}' needs a CUDA GPU and none is visible "
                                "here; use hardware=cpu to run on this machine"))
    from impruver.train.metrics import tracker_problems

    problems += tracker_problems(list(plan.train.report_to))
    problems += hub_problems(plan)
    return problems


def hub_refs(plan: Plan, *, recompose: bool = False) -> list[HubRef]:
    """Every Hub id a run of the plan reads: the model; the tokenizer and each enabled dataset source only while the
    data is still to be composed (a composed run folder carries its own tokenizer and samples). Local paths are
    left out."""
    from impruver.hub import HubRef, is_local

    named = _read_paths(plan, recompose=recompose)
    return [HubRef(key, path, kind) for key, path, kind in named if not is_local(path)]  # type: ignore[arg-type]


def _read_paths(plan: Plan, *, recompose: bool = False) -> list[tuple[str, str, str]]:
    """(setting, path, "model" | "dataset") of every path a run of the plan reads: the model; the tokenizer and each
    enabled dataset source only while the data is still to be composed."""
    from impruver.components import tokenizer_reads_path

    named: list[tuple[str, str | None, str]] = []
    if plan.model.weights != "random" or plan.model.arch is None:  # random weights built from `arch` read no path
        named.append(("model.path", plan.model.path, "model"))
    if recompose or not composed(plan):
        if tokenizer_reads_path(plan.tokenizer.builder):
            named.append(("tokenizer.path", plan.tokenizer.path, "model"))
        named += [(f"dataset.sources.{name}.path", source.path, "dataset") for name, source in plan.sources.items()]
    return [(key, path, kind) for key, path, kind in named if path]


def missing_local(plan: Plan, *, recompose: bool = False) -> list[Problem]:
    """A problem per local path the run reads that does not exist (a Hub id is :func:`hub_refs`' to check); one
    under impruver's outputs folder is a run not trained yet."""
    from impruver.hub import is_local
    from impruver.layout import OUTPUTS_ROOT

    problems = []
    for key, path, _ in _read_paths(plan, recompose=recompose):
        if path.startswith("pkg://") or not is_local(path) or Path(path).expanduser().exists():
            continue
        hint = (_untrained_run_hint(path[len(OUTPUTS_ROOT) + 1:]) if path.startswith(f"{OUTPUTS_ROOT}/") else
                f"relative paths start at {Path.cwd()}")
        problems.append(Problem(key, f"no file or folder at {path}: {hint}"))
    return problems


def _untrained_run_hint(name: str) -> str:
    """Why outputs/NAME is missing: a run not trained yet, and the command that trains it when NAME is a preset's
    folder (a preset for an objective starts from its preset's run: outputs/demo for preset=demo objective=dpo)."""
    from impruver.compose import list_options

    if name.rstrip("/") in list_options("preset"):
        return f"it is the folder `impruver preset={name.rstrip('/')}` trains: run that first"
    return "it is the output folder of a run not trained yet: train that run first"


def composed(plan: Plan) -> bool:
    """The run folder holds composed samples (whether they are current is the data stage's to decide: a stale
    composition of Hub sources recomposes, and then reports an unreachable source itself)."""
    return Path(plan.train_path).is_file() and Path(plan.val_path).is_file()


def hub_problems(plan: Plan) -> list[Problem]:
    """One problem per Hub id that is neither cached nor reachable (one probe for all of them, no retries)."""
    from impruver.hub import download_command, missing

    refs, why = missing(hub_refs(plan))
    return [Problem(r.key, f"'{r.repo_id}' is a Hugging Face Hub {r.repo_type} id, not in this machine's cache, and "
                    f"{why}: download it ({download_command(r.repo_id, r.repo_type)}) and set {r.key}=DIR")
            for r in refs]


def check_hub(plan: Plan, *, recompose: bool = False) -> None:
    """Raise one error naming every Hub id of the plan this machine lacks, else one naming every missing local path,
    before anything is composed or loaded."""
    from impruver.hub import missing, missing_error

    refs, why = missing(hub_refs(plan, recompose=recompose))
    if refs:  # the downloads first: each with its command (a local path missing too is named once they are here)
        raise missing_error(refs, why)
    local = missing_local(plan, recompose=recompose)
    if local:
        raise ConfigError(local)


def _kind(key: str) -> str:
    return {"method": "methods", "train.optimizer": "optimizers", "hardware.distributed": "strategies"}[key]


def has_nvidia_driver() -> bool:
    """A CUDA driver is loaded, or CUDA devices were assigned to this process."""
    return Path("/proc/driver/nvidia").exists() or os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1")


__all__ = ["check_hub", "composed", "environment_problems", "has_nvidia_driver", "hub_problems", "hub_refs"]
