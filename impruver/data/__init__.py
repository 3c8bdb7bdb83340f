"""Dataset composition (`impruver compose`): a mix of sources into training and validation samples.

Modules, in the order data flows through them:

* :mod:`~impruver.data.sources`: local files and folders (json, jsonl, parquet, csv, txt), ``pkg://`` files and
  Hub datasets, streamed, sliced (``train[:1000]``), limited and sampled;
* :mod:`~impruver.data.formats`: registered formats turning a record into conversations (instruct, saiga,
  sharegpt, openai, roleplay, text, reasoning) in the canonical form of :mod:`~impruver.data.messages`;
* :mod:`~impruver.data.templates` / :mod:`~impruver.data.tokenizers`: chat templates by name and the tokenizer
  builders (hf, bpe);
* :mod:`~impruver.data.render`: one rendering per conversation, one tokenization, the loss mask;
* :mod:`~impruver.data.dedup`: exact and MinHash-LSH near-duplicate detection;
* :mod:`~impruver.data.convert`: the per-chunk work of the worker processes;
* :mod:`~impruver.data.pipeline`: the recipe (``run``, ``ensure_composed``, ``load_composed_tokenizer``).

Nothing here imports torch, transformers or datasets at module level.
"""
