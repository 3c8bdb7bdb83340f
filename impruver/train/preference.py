"""Preference batches and their loss: pairs (or KTO's labelled answers) packed into rows, scored, and handed to
the plan's objective (:mod:`impruver.objectives`).

A tokenized pair is ``{"chosen": {"input_ids", "labels"}, "rejected": {"input_ids", "labels"}}`` (each the whole
prompt + answer, labels IGNORE_INDEX on the prompt, as the SFT record); a labelled answer is
``{"completion": {"input_ids", "labels"}, "label": bool}``. In a batch of B pairs, sequences 0..B-1 are the
chosen answers and B..2B-1 the rejected ones; with packing they share rows freely, each scored as its own
sequence (its own position_ids, so no attention across sequences; see :mod:`impruver.train.data`).

The reference log-probs come from, in this order: the batch (``ref_sums``: precomputed before training), a
frozen reference module given to :class:`PreferenceLoss`, or the policy itself with its adapter disabled (peft's
``disable_adapter``): for adapter methods the reference costs no memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from impruver.objectives import Metrics, SequenceLogps, model_sequence_logps
from impruver.record import IGNORE_INDEX, INPUT_IDS, LABELS
from impruver.train.data import pack

Tokenized = dict[str, Any]  # {"input_ids": [...], "labels": [...]}
REF_LOGPS = "ref_logps"  # a pair's precomputed reference log-probs: [chosen sum, rejected sum]
ROUND = 64  # row widths are multiples of this: tile-friendly, and short sequences can still share a row


def collate_sequences(sequences: Sequence[Tokenized], *, pad_id: int, seq_len: int | None,
                      packed: bool) -> dict[str, Any]:
    """Rows of sequences: ``input_ids`` / ``position_ids`` / ``targets`` / ``sequence_ids`` [rows, width] (int64),
    ``n_sequences``, and ``attention_mask`` when rows are padded single sequences rather than packed ones.

    ``targets[t]`` is the label of position t + 1 of the same sequence (IGNORE_INDEX at each sequence's last
    token, on prompts and on padding). Packed rows are as wide as the longest sequence (rounded up to ``ROUND``,
    at most ``seq_len``), filled best-fit as SFT packs; padded rows hold one sequence each.
    """
    lengths = np.array([len(s[INPUT_IDS]) for s in sequences])
    longest = int(lengths.max())
    width = -(-longest // ROUND) * ROUND
    if packed:
        if seq_len is None or longest > seq_len:
            raise ValueError(f"packed preference rows need seq_len >= the longest sequence ({longest})")
        # Rows as wide as the batch's longest sequence, not seq_len: attention costs width^2 per row (on the CPU and
        # with SDPA a packed row is one masked square, the masked-out part computed too) and every padded slot runs
        # through every layer, so the narrowest rows that hold each sequence whole are the cheapest; best-fit fills
        # them with the shorter ones.
        width = min(width, seq_len)
        rows = pack(lengths, width)
    else:
        rows = [[i] for i in range(len(sequences))]
    shape = (len(rows), width)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    targets = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    seq_ids = np.zeros(shape, dtype=np.int64)
    mask = np.zeros(shape, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ids, labels = sequences[i][INPUT_IDS], sequences[i][LABELS]
            n = len(ids)
            input_ids[r, at:at + n] = ids
            targets[r, at:at + n - 1] = labels[1:]  # next-token targets, never across sequences
            positions[r, at:at + n] = np.arange(n)
            seq_ids[r, at:at + n] = i
            mask[r, at:at + n] = 1
            at += n
        positions[r, at:] = np.arange(width - at)  # padding: a segment of its own, attending to nothing real
    batch: dict[str, Any] = {"input_ids": torch.from_numpy(input_ids), "position_ids": torch.from_numpy(positions),
                             "targets": torch.from_numpy(targets), "sequence_ids": torch.from_numpy(seq_ids),
                             "n_sequences": len(sequences)}
    if not packed:
        batch["attention_mask"] = torch.from_numpy(mask)
    return batch


def collate_pairs(pairs: Sequence[dict[str, Tokenized]], *, pad_id: int, seq_len: int | None,
                  packed: bool) -> dict[str, Any]:
    """A batch of B pairs: sequences [chosen_0..chosen_B-1, rejected_0..rejected_B-1], plus ``n_pairs``."""
    sequences = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    batch = collate_sequences(sequences, pad_id=pad_id, seq_len=seq_len, packed=packed)
    batch["n_pairs"] = len(pairs)
    if all(REF_LOGPS in p for p in pairs):  # precomputed reference: [chosen..., rejected...] as the sequences
        batch["ref_sums"] = torch.tensor([p[REF_LOGPS][0] for p in pairs] + [p[REF_LOGPS][1] for p in pairs])
    return batch


def precompute_reference(model: Any, pairs: Sequence[dict[str, Any]], *, pad_id: int, seq_len: int,
                         batch_size: int = 16) -> list[dict[str, Any]]:
    """The pairs with their reference log-probs (``ref_logps``: [chosen sum, rejected sum]) computed once by
    ``model`` (the starting weights), so full-parameter training holds no reference copy. Stored beside the
    composed data, they travel with each pair into :func:`collate_pairs`."""
    out = []
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        with torch.no_grad():
            sums = score(model, collate_pairs(chunk, pad_id=pad_id, seq_len=seq_len, packed=True)).sums.tolist()
        n = len(chunk)
        out += [{**p, REF_LOGPS: [sums[i], sums[n + i]]} for i, p in enumerate(chunk)]
    return out


def _split(answer: Tokenized) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, answer ids, answer labels): the prompt ends where the first trained label is."""
    labels = list(answer[LABELS])
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    ids = list(answer[INPUT_IDS])
    return ids[:start], ids[start:], labels[start:]


def collate_labelled(records: Sequence[dict[str, Any]], *, pad_id: int, seq_len: int | None,
                     packed: bool) -> dict[str, Any]:
    """A KTO batch: ``main`` (the B answers), ``kl`` (prompt i with answer i+1: the mismatched pairs of KTO's
    reference point) and ``desirable`` [B] bool."""
    answers = [r["completion"] for r in records]
    parts = [_split(a) for a in answers]
    kl = []
    for i, (prompt, _, _) in enumerate(parts):
        _, ids, labels = parts[(i + 1) % len(parts)]
        kl.append({INPUT_IDS: prompt + ids, LABELS: [IGNORE_INDEX] * len(prompt) + labels})
    kl_len = None if seq_len is None else max(seq_len, max(len(s[INPUT_IDS]) for s in kl))
    return {"main": collate_sequences(answers, pad_id=pad_id, seq_len=seq_len, packed=packed),
            "kl": collate_sequences(kl, pad_id=pad_id, seq_len=kl_len, packed=packed),
            "desirable": torch.tensor([bool(r["label"]) for r in records])}


def score(model: Any, batch: dict[str, Any]) -> SequenceLogps:
    """Summed answer log-probs and answer lengths of every sequence of a collated batch."""
    return model_sequence_logps(model, batch["input_ids"], batch["position_ids"], batch["targets"],
                                batch["sequence_ids"], batch["n_sequences"], batch.get("attention_mask"))


class PreferenceLoss(torch.nn.Module):
    """``forward(batch) -> (loss, metrics)`` for a preference objective.

    Args:
        objective: an objective from :func:`impruver.objectives.build_objective` (not ``sft``).
        model: the policy being trained.
        reference: a frozen reference module; None: precomputed ``ref_sums`` in the batch, else the policy with its
            adapter disabled (an adapter method), else an error (full training needs one of the two).
    """

    def __init__(self, objective: Any, model: Any, reference: Any | None = None) -> None:
        super().__init__()
        if not objective.preference:
            raise ValueError(f"objective '{objective.name}' is not a preference objective (SFT uses TokenLoss)")
        self.objective = objective
        self.model = model
        # Not a submodule: the reference is frozen and outside the trained module, so it is never in a checkpoint,
        # the final weights, an optimizer's groups or a strategy's wrapping (the recipe moves it to the device).
        object.__setattr__(self, "reference", reference)
        if reference is not None:
            reference.requires_grad_(False).eval()

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Metrics]:
        if self.objective.pairs:
            return self._pairs(batch)
        return self._labelled(batch)

    def _pairs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Metrics]:
        n = batch["n_pairs"]
        policy = score(self.model, batch)
        ref = self._reference_sums(batch, "ref_sums")
        return self.objective.loss(policy.sums[:n], policy.sums[n:],
                                   None if ref is None else ref[:n], None if ref is None else ref[n:],
                                   chosen_tokens=policy.tokens[:n], rejected_tokens=policy.tokens[n:])

    def _labelled(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Metrics]:
        good = batch["desirable"]
        policy = score(self.model, batch["main"]).sums
        with torch.no_grad():
            policy_kl = score(self.model, batch["kl"]).sums
        ref = self._reference_sums(batch["main"], "ref_sums")
        ref_kl = self._reference_sums(batch["kl"], "ref_sums")
        assert ref is not None and ref_kl is not None  # kto needs a reference
        return self.objective.loss(policy[good], policy[~good], ref[good], ref[~good],
                                   policy_kl_logps=policy_kl, ref_kl_logps=ref_kl)

    def _reference_sums(self, batch: dict[str, Any], key: str) -> torch.Tensor | None:
        if not self.objective.needs_reference:
            return None
        if key in batch:
            return batch[key]
        with torch.no_grad(), self._reference_model() as reference:
            return score(reference, batch).sums

    @contextlib.contextmanager
    def _reference_model(self) -> Iterator[Any]:
        if self.reference is not None:
            yield self.reference
            return
        disable = getattr(self.model, "disable_adapter", None)
        if disable is None:
            raise ValueError("full-parameter preference training needs a reference: a frozen copy "
                             "(reference=...) or precomputed reference log-probs (objective.reference=precomputed)")
        with disable():
            yield self.model


__all__ = ["REF_LOGPS", "PreferenceLoss", "collate_labelled", "collate_pairs", "collate_sequences",
           "precompute_reference", "score"]
