"""The tokenizer of a model folder as llama.cpp reads it (``tokenizer.ggml.*`` keys of a GGUF file).

Two kinds of ``tokenizer.json`` vocabulary are written, told apart by what the file says (never by a name):

* a byte-level BPE (GPT-2, ruGPT-3, impruver's own, Qwen, Llama 3): llama.cpp's ``gpt2`` tokenizer model with
  the merges, and the pre-tokenizer (the regex that splits text before merging) the model family names;
* a BPE with byte fallback, converted from SentencePiece (Llama 2, Mistral v1, zephyr): llama.cpp's ``llama``
  (SentencePiece) model. It merges the pair whose result has the highest score, so each token gets minus the
  rank of the merge that makes it: the same order the merges list gives transformers.

Everything else llama.cpp must do the way transformers does (adding BOS or EOS, a space before the text) is found
by tokenizing with the transformers tokenizer itself, not read from configuration files.
"""

from __future__ import annotations

import orjson
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from impruver.errors import RunError

BYTE_TOKEN_LENGTH = 6  # "<0x0A>": SentencePiece's byte-fallback pieces


@dataclass(frozen=True)
class Vocab:
    """What a GGUF file says about a tokenizer."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    scores: list[float] | None  # SentencePiece merge priorities
    merges: list[str] | None  # "a b" per BPE merge, in rank order
    special_ids: dict[str, int]  # bos, eos, unk, pad, ... -> id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None  # SentencePiece only: a "▁" before the text


def read_vocab(folder: Path, tokenizer: Any, *, n_vocab: int, pre_tokenizer: str) -> Vocab:
    """The vocabulary of ``folder``'s ``tokenizer.json``, padded with unused tokens to the model's ``n_vocab`` rows.

    Args:
        folder: a saved transformers tokenizer (``tokenizer.json``).
        tokenizer: the same tokenizer loaded with transformers (asked how it tokenizes).
        n_vocab: rows of the model's embedding matrix (at least the tokenizer's size).
        pre_tokenizer: the family's llama.cpp pre-tokenizer name for a byte-level BPE.

    Raises:
        RunError: no tokenizer.json, a vocabulary kind llama.cpp cannot read, or more tokens than rows.
    """
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise RunError(f"{folder}: no tokenizer.json; save the tokenizer with a transformers fast tokenizer first")
    data = orjson.loads(path.read_bytes())  # Qwen's is 11 MB: orjson parses it several times faster than json
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise RunError(f"{path}: a {model.get('type')} vocabulary; GGUF export writes BPE vocabularies "
                       "(byte-level or SentencePiece-converted)")
    spm = bool(model.get("byte_fallback"))
    ids: dict[int, str] = {i: text for text, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in ids}
    for added in data.get("added_tokens") or []:
        ids[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(ids) >= n_vocab:
        raise RunError(f"{path}: token id {max(ids)} but the model has {n_vocab} embedding rows")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    special = _special_ids(tokenizer)
    if spm:
        for i, text in ids.items():
            if len(text) == BYTE_TOKEN_LENGTH and text.startswith("<0x") and text.endswith(">"):
                types[i] = gguf.TokenType.BYTE
        if special.get("unk") is not None:
            types[special["unk"]] = gguf.TokenType.UNKNOWN
    tokens = [ids.get(i, f"[PAD{i}]") for i in range(n_vocab)]  # rows no token uses (a padded embedding)
    token_types = [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(n_vocab)]
    add_bos, add_eos = _adds(tokenizer)
    return Vocab(
        model="llama" if spm else "gpt2", pre="default" if spm else pre_tokenizer, tokens=tokens,
        types=token_types, scores=_merge_scores(tokens, merges) if spm else None, merges=None if spm else merges,
        special_ids=special, add_bos=add_bos, add_eos=add_eos,
        add_space_prefix=_space_prefix(tokenizer) if spm else None,
    )


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Minus the rank of the first merge that makes each token (0 for tokens no merge makes)."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _special_ids(tokenizer: Any) -> dict[str, int]:
    """bos / eos / unk / pad / ... ids the tokenizer declares."""
    found = {}
    for kind in ("bos", "eos", "unk", "pad", "sep", "mask"):  # the ids GGUF has keys for
        value = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(value, int):
            found[kind] = value
    return found


def _adds(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding a text adds BOS in front and EOS at the end (asked of the tokenizer by encoding one)."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and full[1:1 + len(plain)] == plain
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and full[-1 - len(plain):-1] == plain
    return add_bos, add_eos


def _space_prefix(tokenizer: Any) -> bool:
    """Whether a SentencePiece tokenizer puts "▁" before the text ("Hi" -> "▁Hi")."""
    first = tokenizer.convert_ids_to_tokens(tokenizer("Hi", add_special_tokens=False)["input_ids"])[0]
    return str(first).startswith("\u2581")


def add_vocab(writer: Any, vocab: Vocab) -> None:
    """Write ``vocab`` into a GGUFWriter's metadata."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
