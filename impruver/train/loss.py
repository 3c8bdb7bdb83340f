"""The training loss as a module: summed next-token cross-entropy over the target tokens of a batch.

For the causal LMs whose model family says so (``head_on_targets``: GPT-2, Llama, Mistral, Qwen2/3, a plugin's:
a plain linear head over the last hidden state), the output head runs only on the positions that have a target. In chat SFT the prompt turns (often half
of the tokens) then cost no head FLOPs and, above all, no logits: the [tokens x vocabulary] logits, their fp32 copy
and their gradient are the largest activations of small and mid-sized models. Any other model goes through its
own forward and the full logits.

Wrapping the model in this module (rather than calling its parts from the loop) keeps DDP's hooks, accelerate's
autocast and torch.compile on the whole computation.
"""

from __future__ import annotations

from typing import Any

import torch

from impruver.record import IGNORE_INDEX

def targets_only(model: Any) -> bool:
    """Whether the head can be applied to selected positions: its family (registry ``families``) says so and the
    decoder and head are accessible."""
    from impruver.families import family_of_module

    family = family_of_module(model)
    return (family is not None and family.head_on_targets and callable(getattr(model, "get_decoder", None))
            and callable(getattr(model, "get_output_embeddings", None)))


class TokenLoss(torch.nn.Module):
    """``forward(input_ids, position_ids, targets[, attention_mask])`` -> the summed cross-entropy (0-d fp32).

    ``targets`` are already shifted (``targets[t]`` is the token after position t, -100 where no loss is taken).
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.head_on_targets = targets_only(model)

    @property
    def _no_split_modules(self) -> Any:
        """The model's transformer block classes: FSDP's transformer auto-wrap shards each block on its own.

        accelerate looks for them on the module it prepares, which is this wrapper, not the model.
        """
        return getattr(self.model, "_no_split_modules", None)

    def tie_weights(self) -> None:
        """Tie the model's input and output embeddings again (accelerate calls it after moving the module)."""
        tie = getattr(self.model, "tie_weights", None)
        if callable(tie):
            tie()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        flat_targets = targets.reshape(-1)  # [batch * length]
        if not self.head_on_targets:
            out = self.model(**inputs)
            logits = out.logits if hasattr(out, "logits") else out  # [batch, length, vocab]
            return _cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_targets)
        hidden = self.model.get_decoder()(**inputs).last_hidden_state  # [batch, length, hidden]
        keep = flat_targets != IGNORE_INDEX
        selected = hidden.reshape(-1, hidden.shape[-1])[keep]  # [targets, hidden]
        logits = self.model.get_output_embeddings()(selected)  # [targets, vocab]
        return _cross_entropy(logits, flat_targets[keep])


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
