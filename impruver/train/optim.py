"""Optimizers (registry ``optimizers``) and learning-rate schedules (registry ``schedulers``).

Optimizer builders take ``params`` (parameter groups from :func:`param_groups`) and the plan's settings;
schedule builders take the ``optimizer`` and ``num_training_steps`` and return a ``LambdaLR`` whose factor
multiplies the peak LR: linear warmup from 0, then the named decay down to ``min_lr_ratio``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from impruver.errors import RunError
from impruver.registry import optimizers, schedulers


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices decay, biases / norms / 1-D weights do not (as nanoGPT)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@optimizers("adamw")
def adamw(*, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.0) -> Any:
    """torch AdamW: the fused kernel when every parameter is on a GPU, multi-tensor 'foreach' otherwise."""
    import torch

    groups = list(params)
    on_gpu = all(p.is_cuda for g in groups for p in (g["params"] if isinstance(g, dict) else [g]))
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=on_gpu or None)


@optimizers("adamw_fused")
def adamw_fused(*, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 0.0) -> Any:
    """torch AdamW with the fused kernel (one launch per step; fastest on a GPU)."""
    import torch

    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)


def _bnb(name: str) -> Any:
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError:
        raise RunError("train.optimizer: the 8-bit optimizers need bitsandbytes (pip install bitsandbytes; CUDA "
                       "only); use train.optimizer=adamw here") from None
    return getattr(bnb_optim, name)


@optimizers("adamw_8bit")
def adamw_8bit(*, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0) -> Any:
    """bitsandbytes 8-bit AdamW: optimizer state in 2 bytes per parameter instead of 8."""
    return _bnb("AdamW8bit")(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


@optimizers("paged_adamw_8bit")
def paged_adamw_8bit(*, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                     eps: float = 1e-8, weight_decay: float = 0.0) -> Any:
    """bitsandbytes paged 8-bit AdamW: state pages out to CPU memory under pressure instead of failing."""
    return _bnb("PagedAdamW8bit")(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


adamw_8bit.requires = paged_adamw_8bit.requires = ("bitsandbytes",)  # type: ignore[attr-defined]  # probed


@optimizers("sgd")
def sgd(*, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0.0) -> Any:
    """SGD with momentum betas[0] (eps unused)."""
    import torch

    return torch.optim.SGD(params, lr=lr, momentum=betas[0], weight_decay=weight_decay)


def _lambda(optimizer: Any, factor: Callable[[int], float]) -> Any:
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, factor)


def _warmup(step: int, warmup_steps: int) -> float | None:
    """The warmup factor (step+1)/warmup while warming up, None after."""
    return (step + 1) / warmup_steps if step < warmup_steps else None


@schedulers("cosine")
def cosine(*, optimizer: Any, num_training_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> Any:
    """Linear warmup, then half a cosine from the peak LR down to ``min_lr_ratio`` x peak at the last step."""
    def factor(step: int) -> float:
        warm = _warmup(step, warmup_steps)
        if warm is not None:
            return warm
        progress = min(1.0, (step - warmup_steps) / max(1, num_training_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return _lambda(optimizer, factor)


@schedulers("linear")
def linear(*, optimizer: Any, num_training_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> Any:
    """Linear warmup, then a straight line from the peak LR down to ``min_lr_ratio`` x peak."""
    def factor(step: int) -> float:
        warm = _warmup(step, warmup_steps)
        if warm is not None:
            return warm
        progress = min(1.0, (step - warmup_steps) / max(1, num_training_steps - warmup_steps))
        return 1 - (1 - min_lr_ratio) * progress

    return _lambda(optimizer, factor)


@schedulers("constant")
def constant(*, optimizer: Any, num_training_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> Any:
    """Linear warmup, then the peak LR throughout."""
    def factor(step: int) -> float:
        warm = _warmup(step, warmup_steps)
        return 1.0 if warm is None else warm

    return _lambda(optimizer, factor)
