"""The sample record: the one definition of what the composed data holds per sample, shared by compose, training,
serving and other tools reading ``data/train.jsonl``.

Each line of ``train.jsonl`` / ``val.jsonl`` is a JSON object with at least:

* ``input_ids``: token ids of the rendered conversation, ``[length]``;
* ``labels``: the same length; the token id where that position is trained, :data:`IGNORE_INDEX` elsewhere
  (labels are *not* shifted: position ``i`` says whether token ``i`` is a target).
"""

from __future__ import annotations

IGNORE_INDEX = -100  # label of a position that is not trained (PyTorch's cross-entropy ignore_index)
INPUT_IDS = "input_ids"
LABELS = "labels"
RECORD_KEYS = (INPUT_IDS, LABELS)

__all__ = ["IGNORE_INDEX", "INPUT_IDS", "LABELS", "RECORD_KEYS"]
