"""Machine probes: what this machine lacks to run a plan, found without importing torch.

Components say what they need (``requires``: importable module names, e.g. a method's or an optimizer's
``("bitsandbytes",)``, a strategy's ``("deepspeed",)``); this module only looks whether it is installed, and
whether a CUDA driver is visible for a GPU hardware profile. ``impruver plan`` shows these as warnings; a run
refuses to start.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from impruver import registry
from impruver.errors import Problem

if TYPE_CHECKING:
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
    return problems


def _kind(key: str) -> str:
    return {"method": "methods", "train.optimizer": "optimizers", "hardware.distributed": "strategies"}[key]


def has_nvidia_driver() -> bool:
    """A CUDA driver is loaded, or CUDA devices were assigned to this process."""
    return Path("/proc/driver/nvidia").exists() or os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1")


__all__ = ["environment_problems", "has_nvidia_driver"]
