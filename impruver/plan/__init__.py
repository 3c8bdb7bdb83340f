"""The plan: a composed configuration validated into a frozen, typed, printable value.

* :mod:`impruver.plan.schema`: the Spec models (sections) and :class:`Plan`;
* :mod:`impruver.plan.build`: :func:`make_plan` and the checks that cross sections (components check themselves);
* :mod:`impruver.plan.io`: ``plan.yaml`` writing and reading, with a version check;
* :mod:`impruver.plan.probes`: what this machine lacks (packages, a CUDA driver).

Nothing heavy (torch, transformers, datasets) is imported: planning is a cheap dry run.
"""

from __future__ import annotations

from typing import Any

from impruver.files import atomic_write_text
from impruver.plan.build import default_output_dir, make_plan
from impruver.plan.io import load_plan, to_yaml, write_plan
from impruver.plan.probes import environment_problems
from impruver.plan.schema import (PLAN_VERSION, ArchSpec, ChatSpec, DatasetSpec, DedupSpec, EvalSpec, ExportSpec, HardwareSpec,
                                  ObjectiveSpec,
                                  MemoryEstimate, MethodSpec, ModelSpec, Plan, SourceSpec, Spec, TokenizerSpec,
                                  TrainSpec, redact)

# The LoRA option models moved to the component that owns them (impruver.train.methods); read lazily from here so
# that importing the plan stays free of the training modules.
_MOVED = {"LoraSpec": "impruver.train.methods", "QuantizationSpec": "impruver.train.methods"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'impruver.plan' has no attribute '{name}'")


__all__ = [
    "PLAN_VERSION", "ArchSpec", "ChatSpec", "DatasetSpec", "DedupSpec", "EvalSpec", "ExportSpec", "HardwareSpec", "ObjectiveSpec", "LoraSpec",
    "MemoryEstimate", "MethodSpec", "ModelSpec", "Plan", "QuantizationSpec", "SourceSpec", "Spec",
    "TokenizerSpec", "TrainSpec", "atomic_write_text", "default_output_dir", "environment_problems", "load_plan",
    "make_plan", "redact", "to_yaml", "write_plan",
]
