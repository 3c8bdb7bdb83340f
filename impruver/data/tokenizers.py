"""Tokenizer builders (``tokenizer.builder``) and the plan's tokenizer with its chat template attached.

* ``hf``: a tokenizer from a local folder or a Hub id (``AutoTokenizer``'s choice, see :func:`load_pretrained`,
  or the user's own class via ``class_path``); remote code only when ``trust_remote_code`` is set.
* ``bpe``: a byte-level BPE that impruver trains on the composed conversations (for models built from scratch),
  with ``<pad>`` (0), ``<s>`` (1), ``</s>`` (2), ``<unk>`` (3); saved, it loads with ``AutoTokenizer``.

transformers and tokenizers are imported inside the functions: registering these builders stays cheap.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from impruver.errors import ConfigError, Problem, RunError
from impruver.registry import tokenizers

# TokenizerSpec keys handed to a builder whose signature takes them (path, vocab_size, ...).
SPEC_KEYS = ("path", "trust_remote_code", "class_path", "vocab_size", "min_frequency")

BPE_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@tokenizers("hf")
def hf_tokenizer(
    *,
    path: str,
    trust_remote_code: bool = False,
    revision: str | None = None,
    class_path: str | None = None,
) -> Any:
    """A Hugging Face tokenizer from a local folder or a Hub id.

    Args:
        path: local folder, or Hub id (fails at once, with the fix, when the Hub is unreachable).
        trust_remote_code: run the repository's own tokenizer code (off unless the config says so).
        revision: Hub revision.
        class_path: ``package.module:Class`` of your own tokenizer class (its ``from_pretrained`` is used).

    Examples:
        >>> tok = hf_tokenizer(path="/models/rugpt3small")  # doctest: +SKIP
    """
    from impruver.hub import hub_unreachable, is_local, require_reachable

    require_reachable(path, "tokenizer", "tokenizer.path")
    try:
        if class_path:
            return _import_class(class_path).from_pretrained(path, trust_remote_code=trust_remote_code,
                                                             revision=revision)
        return load_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as exc:
        if not is_local(path):
            raise hub_unreachable(path, "tokenizer", "tokenizer.path", exc) from None
        raise RunError(f"tokenizer.path: cannot load a tokenizer from {path}: {exc}") from None


@tokenizers("bpe")
def bpe_tokenizer(*, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Any:
    """A byte-level BPE trained on ``texts`` (injected: the composed conversations' text).

    Args:
        texts: the training text, streamed.
        vocab_size: tokens in the vocabulary, special tokens included.
        min_frequency: pairs seen fewer times are never merged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(BPE_SPECIAL_TOKENS.values()), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, **BPE_SPECIAL_TOKENS)


def load_pretrained(path: str | Path, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """``AutoTokenizer.from_pretrained(path)``, without importing torch where AutoTokenizer's choice is plain.

    transformers' ``AutoTokenizer`` module imports its model configurations, and through them torch (about 190 MB
    of a process's memory, a few seconds of start-up): compose, its workers and everything before training need
    none of it. For a local tokenizer folder without a model ``config.json`` and without remote code,
    AutoTokenizer takes the class that ``tokenizer_config.json`` names (``...Fast`` dropped, a Python-backend or
    unknown class read by the generic fast backend); that class is taken here directly, from transformers' own
    namespace, whose lazy imports reach only that model's tokenization module. Any other folder (a model folder,
    whose ``model_type`` may override the class; a Hub id; remote code; LlamaTokenizer, which AutoTokenizer
    swaps for byte-level files) goes through AutoTokenizer itself. Same class, same files: the same tokenizer.
    """
    plain = _plain_tokenizer_class(path) if not trust_remote_code else None
    if plain is not None:
        return plain.from_pretrained(path, revision=revision)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)


def _plain_tokenizer_class(path: str | Path) -> Any | None:
    """The class AutoTokenizer would take for a plain local tokenizer folder (see :func:`load_pretrained`), or
    None where its choice depends on more than ``tokenizer_config.json``'s ``tokenizer_class``."""
    folder = Path(path).expanduser()
    config_path = folder / "tokenizer_config.json"
    if not folder.is_dir() or (folder / "config.json").exists() or not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # AutoTokenizer gives its own message
    name = config.get("tokenizer_class") if isinstance(config, dict) else None
    if not isinstance(name, str) or "auto_map" in config:
        return None
    name = name.removesuffix("Fast")  # as AutoTokenizer does: v5 has one (fast) class per model
    if name in ("LlamaTokenizer", "BloomTokenizer"):  # AutoTokenizer's special cases
        return None
    import transformers
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if name in ("TokenizersBackend", "PreTrainedTokenizer"):  # the generic fast backend, under either name
        return TokenizersBackend
    found = getattr(transformers, name, None)
    if isinstance(found, type) and issubclass(found, TokenizersBackend) and \
            found.__module__.startswith("transformers.models."):
        return found
    return None


hf_tokenizer.needs_texts = False  # type: ignore[attr-defined]  # loaded, not trained
bpe_tokenizer.needs_texts = True  # type: ignore[attr-defined]  # trained on the composed conversations


def _import_class(class_path: str) -> Any:
    module, _, name = class_path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError([Problem("tokenizer.class_path", f"cannot import {class_path}: {exc}")]) from None


def build_tokenizer(spec: Any, *, texts: Iterable[str] | None = None) -> Any:
    """The plan's tokenizer: built by its builder, special tokens added, chat template attached.

    Args:
        spec: the plan's :class:`~impruver.plan.TokenizerSpec`.
        texts: training text for builders that learn a vocabulary (``needs_texts``: bpe).

    Raises:
        ConfigError: no chat template anywhere, or an unknown template name.
    """
    from impruver import registry
    from impruver.components import tokenizer_needs_texts, tokenizer_reads_path
    from impruver.data.templates import resolve_template

    builder = registry.lookup("tokenizers", spec.builder)
    # Every builder gets the spec's keys its signature names, its own options, and (if it is trained on the
    # data) the training text: a plugin's builder gets exactly what a built-in gets.
    params = inspect.signature(builder).parameters
    kwargs = {key: getattr(spec, key) for key in SPEC_KEYS if key in params}
    if tokenizer_reads_path(spec.builder) and not spec.path:
        raise ConfigError([Problem("tokenizer.path", f"the {spec.builder} tokenizer needs a path (a folder or Hub id)")])
    if tokenizer_needs_texts(spec.builder):
        kwargs["texts"] = texts or []
    tokenizer = builder(**kwargs, **spec.options)
    if spec.special_tokens:
        tokenizer.add_special_tokens(dict(spec.special_tokens))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; the collator needs some id
    template = resolve_template(spec.chat_template) if spec.chat_template else tokenizer.chat_template
    if not template:
        raise ConfigError([Problem("tokenizer.chat_template", "the tokenizer has no chat template and none is "
                                   "configured; set tokenizer.chat_template (saiga, zephyr, chatml, a .jinja "
                                   "file, or Jinja source)")])
    tokenizer.chat_template = template
    return tokenizer


# transformers 5 saves a tokenizer built on a `tokenizers` object (impruver's trained BPE, and any loaded without a
# class of its own) as "TokenizersBackend", a class transformers 4.57 (and tools pinned to it, such as llama.cpp's
# converter) does not know; PreTrainedTokenizerFast is the same class under the name every version since 4.x loads.
# is_local / local_files_only record how this process loaded it, not what the folder is: they are dropped.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
LOAD_TIME_KEYS = ("is_local", "local_files_only")


def save_tokenizer(tokenizer: Any, folder: str | Path) -> Path:
    """``tokenizer.save_pretrained(folder)``, with a ``tokenizer_config.json`` every transformers since 4.57 loads.

    Returns:
        The folder.
    """
    from impruver.files import atomic_write_text

    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return folder
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend" and (folder / "tokenizer.json").is_file():
        config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    for key in LOAD_TIME_KEYS:
        config.pop(key, None)
    atomic_write_text(config_path, json.dumps(config, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    return folder


def special_tokens_of(tokenizer: Any) -> dict[str, str]:
    """bos_token, eos_token, ... as strings: the variables a chat template gets."""
    return {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
