"""Components: registered builders that answer for themselves.

The core never matches builder names; it asks the plan's components what they are and what they need.

* :func:`method_of` -> the plan's training method (registry ``methods``). A method component carries its own
  option schema (``Options``, a :class:`~impruver.plan.MethodSpec` subclass: the plan's method section is
  ``{builder, **options}``), its traits (``adapter``, ``random_init``, ``requires``, ``lighter``), its checks, how
  the base is loaded, how the model is wrapped and what it adds to the memory plan.
* Model families live in :mod:`impruver.families`, distribution strategies in :mod:`impruver.strategies`.

CONTRACT (used by the recipe, chat and export; the implementation behind it may change, these names may not):

    method = method_of(plan)
    method.adapter: bool
    method.load_options(plan) -> impruver.train.models.LoadOptions
    method.apply(model, plan) -> model          # the module to train (a peft model for adapters)

A plugin registers a :class:`Method` subclass instance under its name (entry-point group ``impruver_methods``)
and gets exactly what a built-in gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from impruver import registry
from impruver.errors import Problem, RegistryError
from impruver.plan.schema import MethodSpec

if TYPE_CHECKING:
    from impruver.families import Shape
    from impruver.plan import HardwareSpec, ModelSpec, Plan
    from impruver.train.models import LoadOptions

MethodOptions = MethodSpec  # the base of every method's Options: the `builder` key


@dataclass(frozen=True)
class MethodMemory:
    """What a method adds to the memory plan.

    ``trainable``: parameters that get gradients and optimizer state (fp32).
    ``base_bytes_per_param``: bytes per parameter of a frozen base (an adapter's: 2.0 for a 16-bit base, 0.56 for
    a 4-bit one with its block scales); None when there is no frozen base (every weight trains, and the weights
    are counted as master weights under the hardware's precision settings).
    """

    trainable: int
    base_bytes_per_param: float | None = None


@runtime_checkable
class MethodComponent(Protocol):
    """What the core asks a training method."""

    name: str
    Options: type[MethodSpec]
    adapter: bool  # trains an adapter on a frozen base (saved as a peft adapter folder)
    random_init: bool  # the model starts from random weights (model.weights is forced to random)
    requires: tuple[str, ...]  # importable modules this machine needs (probed before a run)
    lighter: tuple[str, ...]  # methods to propose when this one does not fit the memory budget

    def check(self, plan: Plan) -> list[Problem]: ...
    def load_options(self, plan: Plan) -> LoadOptions: ...
    def apply(self, model: Any, plan: Plan) -> Any: ...
    def memory(self, shape: Shape, plan: Plan) -> MethodMemory: ...


class Method:
    """Base of method components: defaults for every trait, and how the base is loaded.

    Subclasses set ``Options`` and the traits and implement :meth:`apply` and :meth:`memory`.
    """

    name: str = ""
    Options: ClassVar[type[MethodSpec]] = MethodSpec
    adapter: ClassVar[bool] = False
    random_init: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()
    lighter: ClassVar[tuple[str, ...]] = ()

    def options(self, plan: Plan) -> Any:
        """The plan's method section as this component's Options (a section of the base type is re-validated)."""
        section = plan.method
        if isinstance(section, self.Options):
            return section
        return self.Options.model_validate({**section.model_dump(), "builder": self.name})

    def check(self, plan: Plan) -> list[Problem]:
        """Contradictions between this method's options and the rest of the plan (none by default)."""
        return []

    def load_options(self, plan: Plan) -> LoadOptions:
        return self.load_with(plan.model, plan.hardware, plan.method)

    def load_with(self, model: ModelSpec, hardware: HardwareSpec, section: MethodSpec) -> LoadOptions:
        """The dtype to load the base in.

        Training every weight keeps fp32 master weights whenever mixed precision is on (the forward runs under
        bf16/fp16 autocast); without mixed precision an explicit ``model.dtype`` is honoured (pure half-precision
        training). Adapter methods load the frozen base in half precision on a GPU (``auto``) and keep the
        adapters in fp32.
        """
        from impruver.train.models import LoadOptions

        half = {"bf16": "bfloat16", "fp16": "float16"}.get(hardware.mixed_precision)
        if self.adapter:
            dtype = model.dtype if model.dtype != "auto" else (half or "float32")
        elif half is not None:
            dtype = "float32"
        else:
            dtype = model.dtype if model.dtype != "auto" else "float32"
        return LoadOptions(dtype=dtype, device=hardware.device)

    def apply(self, model: Any, plan: Plan) -> Any:
        raise NotImplementedError(f"method '{self.name}' does not say how it wraps the model")

    def memory(self, shape: Shape, plan: Plan) -> MethodMemory:
        return MethodMemory(trainable=shape.n_params())

    def __repr__(self) -> str:
        return f"<method {self.name}>"


def method_named(name: str) -> MethodComponent:
    """The method component registered as ``name``; a RegistryError lists the names when there is none or when
    what is registered is not a method component."""
    component = registry.lookup("methods", name)
    if not isinstance(component, MethodComponent):
        raise RegistryError(f"method '{name}' is registered as {component!r}, which is not a method component "
                            "(a class instance with Options, adapter, check, load_options, apply, memory; see "
                            "impruver.components.Method)")
    return component


def method_of(plan: Plan) -> MethodComponent:
    """The training-method component of ``plan``."""
    return method_named(plan.method.builder)


def method_section(name: str) -> type[MethodSpec]:
    """The schema of a method section ``{builder: name, ...}``: the component's Options."""
    options = method_named(name).Options
    if not (isinstance(options, type) and issubclass(options, MethodSpec)):
        raise RegistryError(f"method '{name}': its Options must subclass impruver.components.MethodOptions")
    return options


def methods_taking(key: str) -> list[str]:
    """Registered methods whose options include ``key`` (to name the method an orphan option belongs to)."""
    found = []
    for name in registry.names("methods"):
        try:
            if key in method_section(name).model_fields:
                found.append(name)
        except Exception:  # a plugin that fails to load is reported where it is used, not here
            continue
    return found


# -- tokenizer builders ----------------------------------------------------------------------------------------


def _tokenizer_builder(name: str) -> Any:
    return registry.lookup("tokenizers", name) if registry.has("tokenizers", name) else None


def tokenizer_needs_texts(name: str) -> bool:
    """Whether tokenizer builder ``name`` is trained on the composed data (it gets ``texts=``; bpe does).

    Its ``needs_texts`` trait when it has one, else whether it takes a ``texts`` keyword.
    """
    import inspect

    builder = _tokenizer_builder(name)
    if builder is None:
        return False
    trait = getattr(builder, "needs_texts", None)
    if trait is not None:
        return bool(trait)
    try:
        return "texts" in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False


def tokenizer_reads_path(name: str) -> bool:
    """Whether tokenizer builder ``name`` loads from ``tokenizer.path`` (a required ``path`` keyword)."""
    import inspect

    builder = _tokenizer_builder(name)
    try:
        param = inspect.signature(builder).parameters.get("path") if builder is not None else None
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


__all__ = ["Method", "MethodComponent", "MethodMemory", "MethodOptions", "method_named", "method_of",
           "method_section", "methods_taking",
           "tokenizer_needs_texts", "tokenizer_reads_path"]
