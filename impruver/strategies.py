"""Distribution strategies (registry ``strategies``): how a run is spread over processes.

A strategy answers for itself, so that ``launch``, ``memory`` and the recipe never match its name:

* its ``accelerate launch`` arguments (``launch_args``) and whether it needs a process group even for one
  process (``needs_launcher``: sharding is done by collectives);
* what it shards over the ranks (``shards``, a subset of ``{"params", "grads", "optimizer"}``);
* the accelerate plugin / kwargs handlers it builds from the plan (``accelerator_kwargs``) and how the model and
  optimizer are handed to accelerate (``prepare``);
* how training state is saved and loaded (``save_state`` / ``load_state`` / ``load_weights``) and how the full
  weights are gathered for the final save (``full_state_dict``).

``hardware.distributed`` names one. Built-ins: ``none`` and ``ddp`` (every rank holds the whole model and
optimizer), ``fsdp`` (FSDP2 through accelerate), ``deepspeed_zero2`` and ``deepspeed_zero3``. A plugin registers
its own under the entry-point group ``impruver_strategies`` (an instance of a class with the same members;
subclassing :class:`DataParallel` or :class:`FullyShardedStrategy` is the short way).

CONTRACT (used by launch, memory and the recipe; implementations may change, these names may not):

    strategy = strategy_of(plan)
    strategy.name: str
    strategy.shards: frozenset[str]          # subset of {"params", "grads", "optimizer"}
    strategy.launch_args(plan) -> list[str]  # accelerate launch arguments after the process counts
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from impruver import registry
from impruver.errors import RunError
from impruver.registry import strategies

if TYPE_CHECKING:
    from impruver.plan import Plan

# Files a replicated strategy writes into a checkpoint folder (sharded ones write accelerate's own layout).
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def _flag(value: Any) -> str:
    """An accelerate launch flag value: booleans as accelerate's parser spells them."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def inner_model(accelerator: Any, model: Any) -> Any:
    """The module being trained inside the prepared loss module (``TokenLoss.model``), unwrapped from DDP."""
    return accelerator.unwrap_model(model).model


@dataclass(frozen=True)
class DataParallel:
    """Every rank holds the whole model and optimizer; gradients are averaged (DDP when there are several ranks).

    ``ddp_kwargs`` are DistributedDataParallel arguments the strategy itself fixes (a plugin's ``static_graph``,
    say); the plan's ``train.ddp`` adds to them. Checkpoints hold the trainable weights and the optimizer, written
    once by the main process (every rank has the same ones).
    """

    name: str
    shards: frozenset[str] = frozenset()
    ddp_kwargs: dict[str, Any] = field(default_factory=dict)
    needs_launcher: bool = False  # one process trains in place; several are started by accelerate launch

    def launch_args(self, plan: Plan) -> list[str]:
        # --multi_gpu is accelerate's switch for multi-process data parallel, on CPUs (gloo) as well:
        # `--cpu --num_processes 2` silently starts a single process in accelerate 1.15.
        return ["--multi_gpu"]

    def ddp_arguments(self, plan: Plan) -> dict[str, Any]:
        """The DistributedDataParallel arguments of this run: the strategy's, then ``train.ddp``."""
        return {**self.ddp_kwargs, **{k.removeprefix("ddp_"): v for k, v in plan.train.ddp.items()}}

    def accelerator(self, plan: Plan, **options: Any) -> Any:
        """The ``accelerate.Accelerator`` of this run (device, precision and this strategy's plugin / handlers).

        ``options``: more ``Accelerator`` arguments from the recipe (``log_with``, ``project_config``).
        """
        from accelerate import Accelerator

        return Accelerator(cpu=plan.hardware.device == "cpu", mixed_precision=plan.hardware.mixed_precision,
                           **self.accelerator_kwargs(plan), **options)

    def accelerator_kwargs(self, plan: Plan) -> dict[str, Any]:
        from accelerate.utils import DistributedDataParallelKwargs

        try:  # e.g. train.ddp={ddp_find_unused_parameters: true}
            handler = DistributedDataParallelKwargs(**self.ddp_arguments(plan))
        except TypeError as exc:
            raise RunError(f"train.ddp: {exc} (keys are DistributedDataParallel arguments, e.g. "
                           "ddp_find_unused_parameters)") from None
        return {"kwargs_handlers": [handler]}

    def prepare(self, accelerator: Any, model: Any, optimizer: Any) -> tuple[Any, Any]:
        """Place (and wrap) the loss module and its optimizer; they are prepared together (FSDP2 needs both)."""
        return tuple(accelerator.prepare(model, optimizer))  # type: ignore[return-value]

    def loss_scale(self, plan: Plan) -> float:
        """A factor on each micro-batch's loss before the backward pass: 1 unless the engine rescales it."""
        return 1.0

    def describe(self, plan: Plan) -> dict[str, Any]:
        """What this strategy did, for run.json."""
        return {"name": self.name, "shards": sorted(self.shards), "launch_args": self.launch_args(plan),
                "ddp": self.ddp_arguments(plan)}

    def save_state(self, accelerator: Any, folder: Path, *, model: Any, optimizer: Any) -> None:
        """Trainable weights and optimizer state into ``folder`` (the main process writes; all ranks call)."""
        if not accelerator.is_main_process:
            return
        import torch
        from safetensors.torch import save_file

        save_file(trainable_state(inner_model(accelerator, model)), str(folder / TRAINABLE_FILE))
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load_state(self, accelerator: Any, folder: Path, *, model: Any, optimizer: Any) -> None:
        import torch

        self.load_weights(accelerator, folder, model=model)
        optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=True))

    def load_weights(self, accelerator: Any, folder: Path, *, model: Any) -> None:
        """Only the weights of a checkpoint (the best one, at the end of a run)."""
        load_trainable(folder, inner_model(accelerator, model))

    def full_state_dict(self, accelerator: Any, model: Any) -> dict[str, Any] | None:
        """The whole weights for the final save; None: the main process's own module already has them."""
        return None


@dataclass(frozen=True)
class ShardedStrategy(DataParallel):
    """State lives in shards across the ranks: saved and loaded through accelerate's state API, gathered at the end.

    ``accelerator.save_state`` writes each rank's shard of the weights and the optimizer (torch.distributed
    checkpoint for FSDP's SHARDED_STATE_DICT, DeepSpeed's own files for ZeRO) plus every rank's RNG states;
    ``load_state`` reads them back onto the same number of ranks.
    """

    needs_launcher: bool = True  # sharding happens in collectives: even one process runs in a process group

    def save_state(self, accelerator: Any, folder: Path, *, model: Any, optimizer: Any) -> None:
        accelerator.save_state(str(folder))  # every rank writes its own shard

    def load_state(self, accelerator: Any, folder: Path, *, model: Any, optimizer: Any) -> None:
        accelerator.load_state(str(folder))

    def load_weights(self, accelerator: Any, folder: Path, *, model: Any) -> None:
        # The shards of weights and optimizer are saved together; reading both at the end of a run is harmless.
        accelerator.load_state(str(folder))

    def full_state_dict(self, accelerator: Any, model: Any) -> dict[str, Any] | None:
        """The full weights on the main process (every rank must call: it is a gather), keys of the inner model."""
        state = accelerator.get_state_dict(model)
        if state is None:
            return None
        # Tied weights (GPT-2's lm_head is its token embedding) come back as two gathered copies; keep the first
        # name of each parameter, as the model's own save does for tensors that share storage.
        names: dict[int, list[str]] = {}
        for name, param in inner_model(accelerator, model).named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        tied = {name for group in names.values() for name in group[1:]}
        inner = {key.removeprefix("model."): value for key, value in state.items()}  # TokenLoss.model.<name>
        return {key: value for key, value in inner.items() if key not in tied}


# FSDP2 settings that `hardware.options` may give (accelerate launch flags `--fsdp_<name>`), and how each maps onto
# accelerate's FullyShardedDataParallelPlugin field. FSDP1's `sharding_strategy` is read for old profiles.
FSDP_OPTIONS = {
    "fsdp_version": "fsdp_version",
    "fsdp_reshard_after_forward": "reshard_after_forward",
    "fsdp_auto_wrap_policy": "auto_wrap_policy",
    "fsdp_transformer_layer_cls_to_wrap": "transformer_cls_names_to_wrap",
    "fsdp_min_num_params": "min_num_params",
    "fsdp_activation_checkpointing": "activation_checkpointing",
    "fsdp_offload_params": "cpu_offload",
    "fsdp_state_dict_type": "state_dict_type",
    "fsdp_cpu_ram_efficient_loading": "cpu_ram_efficient_loading",
    "fsdp_sharding_strategy": "reshard_after_forward",
}
# FSDP1 sharding strategies as FSDP2's one switch: free the gathered parameters after the forward pass or not.
_RESHARD = {"FULL_SHARD": True, "HYBRID_SHARD": True, "SHARD_GRAD_OP": False, "_HYBRID_SHARD_ZERO2": False}


@dataclass(frozen=True)
class FullyShardedStrategy(ShardedStrategy):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) through accelerate: parameters, gradients and optimizer sharded.

    The plugin is built from ``hardware.options`` (``fsdp_*`` keys, as ``accelerate launch`` spells them), so the
    frozen plan decides, not the launcher's environment. Transformer auto-wrap finds the block classes through
    the loss module (``TokenLoss._no_split_modules``).
    """

    # Every setting is given, so that nothing comes from the launcher's environment: `accelerate launch
    # --use_fsdp` exports FSDP_CPU_RAM_EFFICIENT_LOADING=true, which (read by the plugin when unset) moves the
    # model to the meta device and reloads it from rank 0, untying tied embeddings on the way.
    defaults: dict[str, Any] = field(default_factory=lambda: {
        "fsdp_version": 2, "fsdp_reshard_after_forward": True, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_activation_checkpointing": False,
        "fsdp_offload_params": False, "fsdp_cpu_ram_efficient_loading": False})

    def options(self, plan: Plan) -> dict[str, Any]:
        return {**self.defaults, **plan.hardware.options}

    def launch_args(self, plan: Plan) -> list[str]:
        args = ["--use_fsdp"]
        for key, value in self.options(plan).items():
            args += [f"--{key}", _flag(value)]
        return args

    def plugin(self, plan: Plan) -> Any:
        """accelerate's FullyShardedDataParallelPlugin for this plan."""
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs: dict[str, Any] = {}
        for key, value in self.options(plan).items():
            if key not in FSDP_OPTIONS:
                raise RunError(f"hardware.options.{key}: not an FSDP setting this strategy knows; "
                               f"known: {', '.join(sorted(FSDP_OPTIONS))}")
            if key == "fsdp_sharding_strategy":
                value = _RESHARD.get(str(value).upper(), True)
            if key == "fsdp_transformer_layer_cls_to_wrap" and isinstance(value, str):
                value = value.split(",")
            kwargs[FSDP_OPTIONS[key]] = value
        try:
            return FullyShardedDataParallelPlugin(**kwargs)
        except (TypeError, ValueError) as exc:
            raise RunError(f"hardware.options: accelerate refuses these FSDP settings: {exc}") from None

    def accelerator_kwargs(self, plan: Plan) -> dict[str, Any]:
        return {"fsdp_plugin": self.plugin(plan)}

    def accelerator(self, plan: Plan, **options: Any) -> Any:
        from accelerate import Accelerator

        kwargs = self.accelerator_kwargs(plan)
        accelerator = Accelerator(cpu=plan.hardware.device == "cpu", mixed_precision=plan.hardware.mixed_precision,
                                  **kwargs, **options)
        _fsdp_on_cpu_processes(accelerator, kwargs["fsdp_plugin"])
        return accelerator

    def describe(self, plan: Plan) -> dict[str, Any]:
        return {"name": self.name, "shards": sorted(self.shards), "launch_args": self.launch_args(plan),
                "fsdp": {k: _flag(v) for k, v in self.options(plan).items()}}

    def prepare(self, accelerator: Any, model: Any, optimizer: Any) -> tuple[Any, Any]:
        from torch.distributed.fsdp import FSDPModule

        model, optimizer = accelerator.prepare(model, optimizer)
        if not isinstance(accelerator.unwrap_model(model), FSDPModule):
            # accelerate falls back to DDP or to nothing without saying so: a run that asked for sharding stops.
            raise RunError(f"hardware.distributed={self.name}: accelerate did not shard the model (distributed type "
                           f"{accelerator.distributed_type}, {accelerator.num_processes} process(es)); FSDP needs "
                           "a process group: start it through accelerate launch (impruver does for this strategy)")
        return model, optimizer


def _fsdp_on_cpu_processes(accelerator: Any, plugin: Any) -> None:
    """Let accelerate shard on CPU processes (gloo), where it would silently fall back to DDP.

    accelerate 1.15 turns its FSDP mode on only for GPU-like process groups (``AcceleratorState`` switches
    MULTI_GPU / MULTI_NPU / ... to FSDP, never MULTI_CPU) and drops the plugin on CPU processes. torch 2.13 runs
    FSDP2 on gloo (``fully_shard``, DTensor collectives, torch.distributed.checkpoint), so on CPU processes the
    strategy puts accelerate's shared state into its FSDP mode itself; everything after that (wrapping, state
    saving, gathering) is accelerate's own FSDP2 code path, the one a GPU run takes.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState reads it back


@dataclass(frozen=True)
class DeepSpeedStrategy(ShardedStrategy):
    """DeepSpeed ZeRO stage 2 (gradients and optimizer sharded) or 3 (parameters too) through accelerate.

    DeepSpeed needs its micro-batch size: ``accelerator.prepare`` without a DataLoader refuses an ``auto``
    ``train_micro_batch_size_per_gpu`` in accelerate 1.15, so it is given ``train.batch_size``. The engine also
    accumulates (``gradient_accumulation_steps`` = ``train.grad_accum``) and clips (``train.max_grad_norm``).
    """

    stage: int = 2

    def launch_args(self, plan: Plan) -> list[str]:
        return ["--use_deepspeed", "--zero_stage", str(self.stage),
                "--gradient_accumulation_steps", str(plan.train.grad_accum)]

    def plugin(self, plan: Plan) -> Any:
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin(zero_stage=self.stage, gradient_accumulation_steps=plan.train.grad_accum,
                                 gradient_clipping=plan.train.max_grad_norm or 0.0,
                                 zero3_save_16bit_model=self.stage == 3)
        plugin.deepspeed_config.update(deepspeed_batch_config(plan))
        return plugin

    def accelerator_kwargs(self, plan: Plan) -> dict[str, Any]:
        return {"deepspeed_plugin": self.plugin(plan)}

    def loss_scale(self, plan: Plan) -> float:
        # DeepSpeed's engine divides every micro-batch's loss by gradient_accumulation_steps; the recipe's loss is
        # already the step's token-weighted mean, so that division is undone.
        return float(plan.train.grad_accum)

    def describe(self, plan: Plan) -> dict[str, Any]:
        return {"name": self.name, "shards": sorted(self.shards), "launch_args": self.launch_args(plan),
                "deepspeed": {"zero_stage": self.stage, **deepspeed_batch_config(plan)}}


def deepspeed_batch_config(plan: Plan) -> dict[str, int]:
    """DeepSpeed's batch settings: rows per rank per micro-step, accumulation, and their product over all ranks."""
    ranks = plan.hardware.num_processes * plan.hardware.num_machines
    return {"train_micro_batch_size_per_gpu": plan.train.batch_size,
            "gradient_accumulation_steps": plan.train.grad_accum,
            "train_batch_size": plan.train.batch_size * plan.train.grad_accum * ranks}


def trainable_state(model: Any) -> dict[str, Any]:
    """The parameters that train, by name, detached on the CPU (contiguous, as safetensors wants)."""
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(folder: Path, model: Any) -> None:
    """Copy the saved trainable weights into ``model``; every trainable parameter must be in the file."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(folder / TRAINABLE_FILE))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    unknown = [n for n in saved if n not in params]
    if missing or unknown:
        raise RunError(f"train.resume: {folder} does not match this model (missing {missing[:3]}, unexpected "
                       f"{unknown[:3]}); was it written by another model or method? use train.resume=never")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value.to(params[name].dtype))


for _strategy in (
    DataParallel("none"),
    DataParallel("ddp"),
    FullyShardedStrategy("fsdp", frozenset({"params", "grads", "optimizer"})),
    DeepSpeedStrategy("deepspeed_zero2", frozenset({"grads", "optimizer"}), stage=2),
    DeepSpeedStrategy("deepspeed_zero3", frozenset({"params", "grads", "optimizer"}), stage=3),
):
    strategies(_strategy.name)(_strategy)


def strategy_of(plan: Plan) -> Any:
    """The distribution-strategy component of ``plan`` (``hardware.distributed``)."""
    return registry.lookup("strategies", plan.hardware.distributed)


__all__ = ["DataParallel", "DeepSpeedStrategy", "FullyShardedStrategy", "ShardedStrategy", "strategy_of"]
