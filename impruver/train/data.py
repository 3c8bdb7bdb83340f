"""Token rows for training: read the composed token store (or a JSONL), pack samples into rows, order and collate
batches.

The data stage defined what is trainable (``labels`` = -100 elsewhere); nothing here changes that. Two things
happen to the labels, both exact:

* they are shifted once, here, into next-token ``targets`` (``targets[t] = labels[t + 1]`` within a sample and
  -100 on a sample's last token), so the loss never pairs a token with the next sample's first token;
* in a packed row every sample gets its own ``position_ids`` (0..len-1), which transformers (>= 5.17, sdpa /
  eager / flash) turns into a block-diagonal mask: samples never attend to each other, and the summed loss of a
  packed row equals the summed loss of its samples run one by one.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from impruver.errors import DataError
from impruver.record import IGNORE_INDEX

log = logging.getLogger("impruver")


@dataclass(frozen=True)
class Samples:
    """Tokenized samples: sample i is ``tokens[starts[i]:stops[i]]`` (and the same span of ``labels``).

    ``tokens`` and ``labels`` are the composed token store's memory-mapped arrays (shared by every rank through
    the page cache) or, for a JSONL file, arrays built from it; ``starts`` / ``stops`` (int64, one per sample)
    select the samples kept and cut long ones, so nothing of the store is copied.
    """

    tokens: np.ndarray  # int32, all samples concatenated
    labels: np.ndarray  # int32, -100 where no loss is taken
    starts: np.ndarray  # int64 (n,)
    stops: np.ndarray  # int64 (n,)

    def __len__(self) -> int:
        return len(self.starts)

    def lengths(self) -> np.ndarray:
        """Tokens per sample (computed once)."""
        if "_lengths" not in self.__dict__:
            object.__setattr__(self, "_lengths", self.stops - self.starts)
        return self.__dict__["_lengths"]

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.starts[i], self.stops[i]
        return self.tokens[a:b], self.labels[a:b]


def read_samples(path: str | Path, *, max_len: int) -> Samples:
    """The composed samples of ``path`` (``data/train.jsonl``), samples longer than ``max_len`` truncated and
    untrainable ones dropped.

    Read from the token store beside the file (``train.ids.npy``, ...: memory-mapped, not copied) when compose
    wrote one; a JSONL without a store (written by hand or by another tool), or one changed after the store was
    written, is parsed line by line.

    Raises:
        DataError: a missing file, a store that does not fit together, or a line that is not such a record
            (names the file and line).
    """
    from impruver.data.store import has_store, store_files

    path = Path(path)
    if has_store(path) and not (path.is_file() and path.stat().st_mtime_ns >
                                store_files(path)["offsets"].stat().st_mtime_ns):
        return read_store_samples(path, max_len=max_len)
    if has_store(path):
        log.warning("%s changed after its token store was written: reading the JSONL (recompose to rewrite both)",
                    path)
    return read_jsonl_samples(path, max_len=max_len)


def read_store_samples(path: str | Path, *, max_len: int) -> Samples:
    """The samples of the token store beside ``path``, memory-mapped (see :func:`read_samples`)."""
    from impruver.data.store import open_store

    try:
        ids, labels, offsets = open_store(path)
    except ValueError as exc:
        raise DataError(f"{exc}; recompose with `impruver compose --force`") from None
    return _kept(Path(path), ids, labels, offsets[:-1], offsets[1:], max_len)


def read_jsonl_samples(path: str | Path, *, max_len: int) -> Samples:
    """Read ``{"input_ids", "labels"}`` JSONL into memory (see :func:`read_samples`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no composed data here; run `impruver compose` (or the main job) first")
    tokens: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                ids, labs = _parse_line(line, path, line_no)
                tokens.append(ids)
                labels.append(labs)
    offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in tokens], out=offsets[1:])
    empty = np.zeros(0, dtype=np.int32)
    flat_ids = np.concatenate(tokens) if tokens else empty
    return _kept(path, flat_ids, np.concatenate(labels) if labels else empty, offsets[:-1], offsets[1:], max_len)


_BLOCK_TOKENS = 1 << 22  # tokens of labels looked at at once when finding the trainable samples (16 MB of int32)


def _kept(path: Path, tokens: np.ndarray, labels: np.ndarray, starts: np.ndarray, stops: np.ndarray,
          max_len: int) -> Samples:
    """Samples cut to ``max_len`` tokens, those with nothing to predict dropped (the first token is never a
    target); the labels are scanned in bounded blocks, so a memory-mapped store is read, never copied whole."""
    starts = np.asarray(starts, dtype=np.int64)
    full = np.asarray(stops, dtype=np.int64)
    stops = np.minimum(full, starts + max_len)
    keep = np.zeros(len(starts), dtype=bool)
    first = 0
    while first < len(starts):
        # Samples first..last-1 lie in tokens[starts[first]:stops[last - 1]] (consecutive in the file).
        last = max(first + 1, int(np.searchsorted(starts, starts[first] + _BLOCK_TOKENS, side="right")))
        base = int(starts[first])
        # trained[k]: trained labels among the block's first k (int32: a block is at most a few million tokens)
        trained = np.r_[0, np.cumsum(labels[base:int(full[last - 1])] != IGNORE_INDEX, dtype=np.int32)]
        a, b = starts[first:last] - base + 1, stops[first:last] - base  # a sample's targets: labels[a:b] (block)
        a = np.minimum(a, len(trained) - 1)
        keep[first:last] = (b > a) & (trained[np.maximum(b, a)] > trained[a])
        first = last
    truncated = int((full > stops)[keep].sum())
    if truncated:
        log.warning("%s: %d samples longer than %d tokens were truncated", path.name, truncated, max_len)
    if (~keep).any():
        log.warning("%s: %d samples with no trainable token were skipped", path.name, int((~keep).sum()))
    return Samples(tokens, labels, starts[keep], stops[keep])


def _parse_line(line: str, path: Path, line_no: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        record = json.loads(line)
        ids = np.asarray(record["input_ids"], dtype=np.int32)
        labs = np.asarray(record.get("labels", record["input_ids"]), dtype=np.int32)
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}:{line_no}: not a tokenized record with input_ids and labels "
                        f"({type(exc).__name__}: {exc}); recompose with `impruver compose --force`") from None
    if ids.ndim != 1 or ids.shape != labs.shape:
        raise DataError(f"{path}:{line_no}: input_ids and labels must be flat lists of the same length "
                        f"(got {ids.shape} and {labs.shape})")
    return ids, labs


def pack(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Group sample indices into rows of at most ``seq_len`` tokens (best-fit decreasing; deterministic).

    Longest samples first, each into the fullest row it still fits, so rows end up nearly full.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order:
        n = int(lengths[i])
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            room, row = seq_len - n, len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def make_rows(samples: Samples, *, seq_len: int, packing: bool) -> list[list[int]]:
    """Rows of sample indices: packed into ``seq_len``-token rows, or one sample per row."""
    if packing:
        return pack(samples.lengths(), seq_len)
    return [[i] for i in range(len(samples))]


@dataclass(frozen=True)
class Batches:
    """The micro-batch order: a fresh seeded shuffle of the rows each epoch, sliced per rank.

    The order depends only on (seed, epoch, index), so a resumed run sees exactly the batches it would have.
    """

    rows: list[list[int]]
    batch_size: int  # rows per rank per micro-batch
    seed: int
    world_size: int = 1
    rank: int = 0
    shuffle: bool = True

    @property
    def per_epoch(self) -> int:
        """Micro-batches per epoch (the last may be smaller; with several ranks it wraps around instead)."""
        return max(1, -(-len(self.rows) // (self.batch_size * self.world_size)))

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.rows))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def get(self, epoch: int, index: int) -> list[list[int]]:
        """The rows of micro-batch ``index`` of ``epoch`` for this rank."""
        order = self.order(epoch)
        start = (index * self.world_size + self.rank) * self.batch_size
        picks = np.arange(start, start + self.batch_size)
        if self.world_size > 1:
            picks = picks % len(order)  # every rank gets a full batch (as DistributedSampler pads)
        picks = picks[picks < len(order)]
        return [self.rows[j] for j in order[picks]]

    def epoch(self, epoch: int) -> Iterator[list[list[int]]]:
        for i in range(self.per_epoch):
            yield self.get(epoch, i)


def collate(samples: Samples, rows: list[list[int]], *, pad_id: int, seq_len: int | None,
            packed: bool) -> dict[str, Any]:
    """Tensors of one micro-batch.

    Returns ``input_ids`` / ``position_ids`` / ``targets`` of shape [batch, length] (int64), plus
    ``attention_mask`` when rows are padded samples rather than packed ones, and ``n_tokens`` (real tokens)
    and ``n_targets`` (tokens the loss counts). Packed rows are padded to ``seq_len`` (a fixed shape for
    torch.compile); unpacked ones to the batch's longest row rounded up to a multiple of 8.
    """
    import torch

    lengths = samples.lengths()
    longest = max(int(lengths[row].sum()) for row in rows)
    width = seq_len if packed and seq_len else -(-longest // 8) * 8
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ids, labs = samples.sample(i)
            n = len(ids)
            input_ids[r, at:at + n] = ids
            targets[r, at:at + n - 1] = labs[1:]  # next-token targets, never across samples
            positions[r, at:at + n] = np.arange(n)
            mask[r, at:at + n] = 1
            at += n
        positions[r, at:] = np.arange(width - at)  # padding is a segment of its own: it attends to nothing real
    batch: dict[str, Any] = {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(positions),
        "targets": torch.from_numpy(targets),
        "n_tokens": int(mask.sum()),
        "n_targets": int((targets != IGNORE_INDEX).sum()),
    }
    if not packed:
        batch["attention_mask"] = torch.from_numpy(mask)
    return batch
