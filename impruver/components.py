"""Components: registered builders that answer for themselves.

The core never matches builder names; it asks the plan's components what they are and what they need.

* :func:`method_of` -> the plan's training method (registry ``methods``): ``adapter`` (trains an adapter on a frozen
  base?), ``load_options(plan)`` (how the base is loaded), ``apply(model, plan)`` (the model to train).

CONTRACT (used by the recipe, chat and export; the implementation behind it may change, these names may not):

    method = method_of(plan)
    method.adapter: bool
    method.load_options(plan) -> impruver.train.models.LoadOptions
    method.apply(model, plan) -> model          # the module to train (a peft model for adapters)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from impruver import registry

if TYPE_CHECKING:
    from impruver.plan import Plan


@dataclass(frozen=True)
class _MethodView:
    """Transitional adapter over the function builders (to be replaced by method components)."""

    name: str

    @property
    def adapter(self) -> bool:
        return self.name in ("lora", "qlora")

    def load_options(self, plan: Plan) -> Any:
        from impruver.train.methods import load_options

        return load_options(method=plan.method, model=plan.model, hardware=plan.hardware)

    def apply(self, model: Any, plan: Plan) -> Any:
        return registry.lookup("methods", self.name)(spec=plan.method, model=model, **plan.method.options)


def method_of(plan: Plan) -> Any:
    """The training-method component of ``plan``."""
    return _MethodView(plan.method.builder)


__all__ = ["method_of"]
