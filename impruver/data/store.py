"""The composed data as a memory-mapped token store: what every training rank reads, without copying.

Beside each composed JSONL (``data/train.jsonl``) compose writes three ``.npy`` files::

    data/train.ids.npy       int32 (tokens,)       every sample's input ids, concatenated
    data/train.labels.npy    int32 (tokens,)       the same positions' labels, -100 where no loss is taken
    data/train.offsets.npy   int64 (samples + 1,)  sample i is ids[offsets[i]:offsets[i + 1]]

Readers open them with ``np.load(mmap_mode="r")``: the arrays are file-backed, read-only pages of the page
cache, so two ranks on one machine share one copy of the data (their proportional set sizes for the files sum to
about one file), and a rank touches only the pages of the samples it reads. int32 holds any vocabulary (uint16
would halve the size below 65,536 tokens; one dtype keeps every reader simple and safe).

The JSONL beside the store holds the same samples, line for line (``{"input_ids", "labels", "attention_mask"}``),
for other tools; the store is what impruver trains on. Files are written sequentially (header first, from the
known totals, then the data in order), never held whole in memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

PARTS = ("ids", "labels", "offsets")
DTYPES = {"ids": np.dtype(np.int32), "labels": np.dtype(np.int32), "offsets": np.dtype(np.int64)}


def store_files(jsonl: str | os.PathLike[str]) -> dict[str, Path]:
    """The store's files beside a composed JSONL: ``train.jsonl`` -> ``train.ids.npy`` and so on."""
    jsonl = Path(jsonl)
    stem = jsonl.name[:-len(jsonl.suffix)] if jsonl.suffix else jsonl.name
    return {part: jsonl.with_name(f"{stem}.{part}.npy") for part in PARTS}


def has_store(jsonl: str | os.PathLike[str]) -> bool:
    return all(path.is_file() for path in store_files(jsonl).values())


def open_store(jsonl: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, offsets) of the store beside ``jsonl``, memory-mapped read-only (nothing is read yet).

    Raises:
        ValueError: files that do not fit together (a store cut short or mixed from two composes).
    """
    files = store_files(jsonl)
    ids, labels, offsets = (np.load(files[part], mmap_mode="r", allow_pickle=False) for part in PARTS)
    for part, array in zip(PARTS, (ids, labels, offsets)):
        if array.dtype != DTYPES[part] or array.ndim != 1:
            raise ValueError(f"{files[part]}: {array.dtype} {array.shape}, expected a flat {DTYPES[part]} array")
    if ids.shape != labels.shape or len(offsets) < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != len(ids):
        raise ValueError(f"{files['ids'].parent}: ids {ids.shape}, labels {labels.shape} and offsets "
                         f"(last {int(offsets[-1]) if len(offsets) else None}) do not describe one set of samples")
    return ids, labels, offsets


class StoreWriter:
    """Writes one store sequentially; the totals are known up front, so each ``.npy`` header is written first.

    ``add(ids, labels, lengths)`` appends consecutive samples (their tokens concatenated, ``lengths`` tokens
    each); ``close()`` checks that exactly the announced totals arrived.
    """

    def __init__(self, files: dict[str, Path], *, tokens: int, samples: int) -> None:
        self.files = files
        self.expected = {"ids": tokens, "labels": tokens, "offsets": samples + 1}
        self.written = dict.fromkeys(PARTS, 0)
        self.end = 0  # offset of the end of the last sample written
        self.handles: dict[str, BinaryIO] = {}
        for part in PARTS:
            handle = files[part].open("wb")
            np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(DTYPES[part]),
                                                          "fortran_order": False,
                                                          "shape": (self.expected[part],)})
            self.handles[part] = handle
        self._put("offsets", np.zeros(1, dtype=np.int64))

    def add(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> None:
        if len(ids) != len(labels) or len(ids) != int(np.sum(lengths, dtype=np.int64)):
            raise ValueError(f"{len(ids)} ids, {len(labels)} labels for samples of {int(np.sum(lengths))} tokens")
        self._put("ids", ids)
        self._put("labels", labels)
        ends = self.end + np.cumsum(lengths, dtype=np.int64)
        self._put("offsets", ends)
        if len(ends):
            self.end = int(ends[-1])

    def _put(self, part: str, values: np.ndarray) -> None:
        self.handles[part].write(np.ascontiguousarray(values, dtype=DTYPES[part]).tobytes())
        self.written[part] += len(values)

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        if self.written != self.expected:
            raise RuntimeError(f"token store {self.files['ids'].parent}: wrote {self.written}, announced "
                               f"{self.expected}")


__all__ = ["PARTS", "StoreWriter", "has_store", "open_store", "store_files"]
