"""GGUF export proven by llama.cpp itself (the llama-cpp-python binding), family by family.

One tiny random model per family, with a real tokenizer (``../shared/data/tokenizers``), is exported once
(module fixture) to f16 and q8_0 (and q4_k_m where its rows are multiples of 256); llama.cpp loads each file and
is compared with transformers on the same prompt: logits, the greedy continuation, the tokenizer's ids on
Russian and English text, and the chat template read back from the GGUF metadata as llama-cpp-python applies it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import llama_cpp  # never skipped: a missing binding fails the run (the test extra installs llama-cpp-python)

TEXTS = ["Hello, world! How are you today? 12345", "Привет, мир! Как у тебя дела сегодня? Всё хорошо.",
         "  two  spaces, tabs\tand\nnew lines; ёлка и ЁЖ"]
CHAT = [{"role": "system", "content": "Ты полезный помощник."}, {"role": "user", "content": "Привет! Кто ты?"},
        {"role": "assistant", "content": "Я ассистент. Чем помочь?"}, {"role": "user", "content": "Расскажи сказку."}]

# (family, tokenizer, template, config). Widths of 256 let k-quants (256-value blocks) quantize every matrix;
# the Qwen vocabulary (151,669 rows) gets a narrower model to keep the test fast.
CASES = {
    "gpt2": ("gpt2", "saiga", {"n_embd": 128, "n_layer": 2, "n_head": 4, "n_positions": 128}),
    "llama": ("llama2", "zephyr", {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "max_position_embeddings": 128, "tie_word_embeddings": False}),
    "mistral": ("mistral", "mistral_v1", {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                                          "num_attention_heads": 4, "num_key_value_heads": 2,
                                          "max_position_embeddings": 128}),
    "qwen2": ("qwen", "chatml", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                                 "tie_word_embeddings": True}),
    "qwen3": ("qwen", "qwen3", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                "max_position_embeddings": 128, "tie_word_embeddings": True}),
}
K_QUANT = {"llama"}  # rows of 256 and 512 values: q4_k_m quantizes every matrix with k-quants
PROMPT = "Привет! The quick brown fox"
STEPS = 6


def _tokenizer(kind: str, folder: Path, data: Path) -> Any:
    """A real tokenizer of ``kind`` saved in ``folder`` (the shared data README's recipes)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder.mkdir(parents=True)
    root = data / "tokenizers"
    if kind == "gpt2":
        tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "gpt2/tokenizer.json"), bos_token="<|endoftext|>",
                                      eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    elif kind in ("llama2", "mistral"):
        source = root / ("llama2" if kind == "llama2" else "mistral_7b_v1_zephyr") / "tokenizer.model"
        shutil.copy(source, folder / "tokenizer.model")
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>", "add_bos_token": kind == "llama2", "legacy": True}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        tok = AutoTokenizer.from_pretrained(folder)
        (folder / "tokenizer.model").unlink()  # the export reads what transformers saves: tokenizer.json
    else:
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(root / "qwen2" / name, folder / name)
        shutil.copy(root / "qwen2/qwen3_30b_tokenizer_config.json", folder / "tokenizer_config.json")
        tok = AutoTokenizer.from_pretrained(folder)
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            (folder / name).unlink()
    return tok


def _template(name: str, tok: Any, data: Path) -> str:
    from impruver.data.templates import resolve_template

    if name == "mistral_v1":
        return (data / "tokenizers/mistral_7b_v1_zephyr/mistral_v1_spm_chat_template.jinja").read_text()
    if name == "qwen3":
        return tok.chat_template  # Qwen3's own tool-aware template, as the real config ships it
    return resolve_template(name)


def _build(family: str, root: Path, data: Path) -> dict[str, Any]:
    """A random ``family`` model with its tokenizer saved to ``root/model``, exported to ``root/gguf``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from impruver.gguf.export import export_gguf

    kind, template, arch = CASES[family]
    tok = _tokenizer(kind, root / "tok", data)
    tok.chat_template = _template(template, tok, data)
    config = AutoConfig.for_model(family, vocab_size=len(tok), initializer_range=0.15, **arch,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so a mix-up between them shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    kinds = ["f16", "q8_0", *(["q4_k_m"] if family in K_QUANT else [])]
    files = export_gguf(root / "model", root / "gguf", kinds, name=family)
    return {"model": model, "tok": tok, "files": {f["type"]: Path(f["path"]) for f in files},
            "records": files}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("gguf")
    return {family: _build(family, root / family, shared_data) for family in CASES}


def _llama(path: Path) -> Any:
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=2, verbose=False)


def _hf_logits(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _cpp_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def _greedy(llm: Any, ids: list[int]) -> list[int]:
    """llama.cpp's greedy continuation (argmax of its logits, fed back one token at a time)."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(STEPS):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """RMS of the difference over the RMS spread of the reference logits."""
    return float(np.sqrt(np.mean((got - want) ** 2)) / np.std(want))


@pytest.mark.parametrize("family", list(CASES))
def test_f16_gives_transformers_logits_and_greedy_continuation(exported: dict[str, Any], family: str) -> None:
    case = exported[family]
    ids = case["tok"](PROMPT)["input_ids"]
    llm = _llama(case["files"]["f16"])
    want = _hf_logits(case["model"], ids)
    got = _cpp_logits(llm, ids)
    assert got.shape == want.shape
    # f16 weights (11-bit mantissa) and f16 activations in places: within 1% of the logits' spread.
    assert _relative_error(got, want) < 0.01, _relative_error(got, want)
    np.testing.assert_allclose(got, want, atol=0.05 * float(np.std(want)), rtol=0)
    import torch

    with torch.no_grad():
        reference = case["model"].generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False,
                                           min_new_tokens=STEPS)[0, len(ids):].tolist()
    assert _greedy(llm, ids) == reference


@pytest.mark.parametrize("family", list(CASES))
def test_quantized_files_stay_within_their_expected_error(exported: dict[str, Any], family: str) -> None:
    case = exported[family]
    ids = case["tok"](PROMPT)["input_ids"]
    want = _hf_logits(case["model"], ids)
    # Expected error of each type on these random weights (measured, with margin): q8_0 keeps 8 bits per value
    # (~0.5% here), q4_k_m 4-6 bits (~6%). f16 is the floor.
    bounds = {"q8_0": 0.03, "q4_k_m": 0.2}
    errors = {kind: _relative_error(_cpp_logits(_llama(case["files"][kind]), ids), want)
              for kind in case["files"] if kind in bounds}
    floor = _relative_error(_cpp_logits(_llama(case["files"]["f16"]), ids), want)
    for kind, error in errors.items():
        assert error < bounds[kind], (kind, error)
        assert error > floor, (kind, error, floor)  # a quantized file really is quantized
    sizes = {r["type"]: r["bytes"] for r in case["records"]}
    assert sizes["q8_0"] < 0.6 * sizes["f16"]


@pytest.mark.parametrize("family", list(CASES))
def test_llama_cpp_tokenizes_like_transformers(exported: dict[str, Any], family: str) -> None:
    case = exported[family]
    llm = llama_cpp.Llama(model_path=str(case["files"]["q8_0"]), vocab_only=True, verbose=False)
    tok = case["tok"]
    for text in TEXTS:
        want = tok(text)["input_ids"]  # with the special tokens the tokenizer adds (BOS for Llama 2)
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == want, text
        assert llm.detokenize(tok(text, add_special_tokens=False)["input_ids"]).decode() == text


@pytest.mark.parametrize("family", list(CASES))
def test_embedded_chat_template_renders_like_apply_chat_template(exported: dict[str, Any], family: str) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    case = exported[family]
    tok = case["tok"]
    llm = llama_cpp.Llama(model_path=str(case["files"]["f16"]), vocab_only=True, verbose=False)
    embedded = llm.metadata["tokenizer.chat_template"]
    assert "generation" not in embedded  # the training-only tags are gone; the text they enclosed stays
    messages = CHAT if family != "mistral" else CHAT[1:]  # Mistral v1 has no system turn
    formatter = Jinja2ChatFormatter(template=embedded, eos_token=tok.eos_token or "", bos_token=tok.bos_token or "",
                                    add_generation_prompt=True)
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert formatter(messages=messages).prompt == want


def test_modelfiles_carry_the_ollama_template_and_stop_strings(exported: dict[str, Any]) -> None:
    from impruver.data.templates import OLLAMA_CHATML, OLLAMA_SAIGA, OLLAMA_ZEPHYR

    expected = {"gpt2": (OLLAMA_SAIGA.replace("<<bos>>", "<|endoftext|>").replace("<<eos>>", "<|endoftext|>"),
                         "<|endoftext|>"),
                "llama": (OLLAMA_ZEPHYR.replace("<<eos>>", "</s>"), "</s>"),
                "qwen2": (OLLAMA_CHATML, "<|im_end|>"),
                "mistral": (None, "</s>"), "qwen3": (None, "<|im_end|>")}
    for family, (template, stop) in expected.items():
        for record in exported[family]["records"]:
            text = Path(record["modelfile"]).read_text()
            assert text.splitlines()[1] == f"FROM ./{Path(record['path']).name}"
            assert f'PARAMETER stop "{stop}"' in text.splitlines()
            if template is None:  # not a registered template: Ollama reads the one embedded in the GGUF
                assert "TEMPLATE" not in text
            else:
                assert f'TEMPLATE """{template}"""' in text


def test_llama_rope_rows_are_reordered_and_qwen_rows_are_not() -> None:
    """The reordering the llama family applies to q/k rows maps rotate-half pairs (i, i + d/2) to (2i, 2i + 1)."""
    import torch

    from impruver.families import family_named

    head_dim, heads = 8, 2
    rows = torch.arange(heads * head_dim, dtype=torch.float32).reshape(-1, 1)
    config = {"num_attention_heads": heads, "num_key_value_heads": heads}
    out = family_named("llama").gguf_tensor("model.layers.0.self_attn.q_proj.weight", rows, config)
    assert out[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert family_named("qwen2").gguf_tensor("model.layers.0.self_attn.q_proj.weight", rows, config) is rows
