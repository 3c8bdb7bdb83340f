"""Target-token log-probs through the output head without keeping [tokens x vocabulary] logits.

A preference step needs one number per target token: ``log softmax(h W^T + b)[y]``. Computed the plain way,
autograd keeps the logits and their log-softmax ([targets, vocab] each, fp32) until the backward pass: with a
vocabulary of 50k and a few thousand targets that is the largest tensor of the step. Here the head runs over
chunks of targets and each chunk's logits are dropped as soon as its results are taken:

* no gradient needed (the reference pass, evaluation): only the log-probs are kept;
* the head frozen (LoRA and the other adapter methods leave it alone): the gradient of a token's log-prob with
  respect to its hidden state, ``W[y] - softmax(h W^T + b) W``, is worked out in the same pass ([targets, hidden],
  a vocab/hidden-th of the logits) and the backward pass only scales it by each token's upstream gradient;
* the head trained (full fine-tuning, or an adapter on the head): the plain computation, which autograd can
  differentiate with respect to the weights too.

TRL's ``fused_lm_head`` tiles the head the same way; with the head frozen this one also needs no recomputation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB in fp32): bounds the transient [chunk, vocab] tensors


def head_token_logps(head: Any, hidden: Tensor, targets: Tensor) -> Tensor:
    """``log_softmax(head(hidden))[targets]`` -> [N] float32, for hidden [N, hidden] and targets [N]."""
    weight, bias = _linear_parts(head)
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    if weight is None or (needs_grad and (weight.requires_grad or (bias is not None and bias.requires_grad))):
        from impruver.objectives import token_logps

        return token_logps(head(hidden), targets)  # a head autograd must differentiate (or not a plain linear layer)
    if not needs_grad:
        with torch.no_grad():
            return _chunked(hidden, weight, bias, targets, with_grad=False)[0]
    return _FrozenHeadLogps.apply(hidden, weight, bias, targets)


def _linear_parts(head: Any) -> tuple[Tensor | None, Tensor | None]:
    """(weight [vocab, hidden], bias [vocab] or None) of a plain ``nn.Linear`` head, else (None, None)."""
    if type(head) is not torch.nn.Linear:  # a subclass (an adapter layer, a quantized head) may compute otherwise
        return None, None
    return head.weight, head.bias


def _chunked(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
             with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Log-probs [N] (fp32) and, ``with_grad``, d logp / d hidden [N, hidden] (in hidden's dtype), chunk by chunk."""
    n, vocab = hidden.shape[0], weight.shape[0]
    step = max(1, CHUNK_ELEMENTS // vocab)
    logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grads = torch.empty_like(hidden) if with_grad else None
    for start in range(0, n, step):
        h, y = hidden[start:start + step], targets[start:start + step]
        logits = torch.nn.functional.linear(h, weight, bias).float()  # [chunk, vocab]
        lse = torch.logsumexp(logits, dim=-1)
        logps[start:start + step] = logits.gather(1, y[:, None]).squeeze(1) - lse
        if grads is not None:
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            # d/dh [h.W[y] + b[y] - logsumexp(hW^T + b)] = W[y] - softmax @ W
            grads[start:start + step] = weight[y] - (probs.to(weight.dtype) @ weight).to(hidden.dtype)
    return logps, grads


class _FrozenHeadLogps(torch.autograd.Function):
    """Token log-probs whose backward is the precomputed per-token gradient times the upstream gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
        logps, grads = _chunked(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), targets,
                                with_grad=True)
        ctx.save_for_backward(grads)
        return logps

    @staticmethod
    def backward(ctx: Any, upstream: Tensor) -> tuple[Tensor | None, None, None, None]:
        (grads,) = ctx.saved_tensors
        return (upstream.to(grads.dtype)[:, None] * grads), None, None, None


__all__ = ["CHUNK_ELEMENTS", "head_token_logps"]
