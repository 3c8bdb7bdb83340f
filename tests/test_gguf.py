"""GGUF export proven by llama.cpp itself (the llama-cpp-python binding), family by family.

One tiny random model per family, with a real tokenizer (``../shared/data/tokenizers``), is exported once
(module fixture) to f16 and q8_0 (and q4_k_m where its rows are multiples of 256); llama.cpp loads each file and
is compared with transformers on the same prompt: logits, the greedy continuation, the tokenizer's ids on
Russian and English text, and the chat template read back from the GGUF metadata as llama-cpp-python applies it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import llama_cpp  # never skipped: a missing binding fails the run (the test extra installs llama-cpp-python)

from impruver.gguf import GGUF_TYPES

TEXTS = ["Hello, world! How are you today? 12345", "Привет, мир! Как у тебя дела сегодня? Всё хорошо.",
         "Съешь же ещё этих мягких французских булок, да выпей чаю. The quick brown fox jumps over the lazy dog."]
# Runs of spaces, tabs and new lines. Byte-level BPEs must agree here too. SentencePiece vocabularies are known to
# differ on runs of spaces: transformers' own conversion splits "  two" as "▁▁ two" where SentencePiece gives
# "▁▁ ▁two", and transformers 5 saves only that conversion (tokenizer.json, no tokenizer.model), whose merge order
# is what the GGUF scores come from; llama.cpp then gives "▁▁ ▁two" and "▁▁ spaces" (measured). Not asserted.
WHITESPACE = "  two  spaces, tabs\tand\nnew lines;  ёлка и ЁЖ\n\n"
SPM = {"llama", "mistral"}
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


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(kind: str, folder: Path, data: Path) -> Any:
    """A real tokenizer of ``kind`` (the shared data README's recipes); built once per kind (Qwen's takes
    seconds) and shared by the families that use it: each case keeps its own template apart (``template``)."""
    if kind not in _TOKENIZERS:
        _TOKENIZERS[kind] = _load_tokenizer(kind, folder, data)
    return _TOKENIZERS[kind]


def _load_tokenizer(kind: str, folder: Path, data: Path) -> Any:
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
    if name == "qwen3":  # Qwen3's own tool-aware template, as the real config ships it
        return json.loads((data / "tokenizers/qwen2/qwen3_30b_tokenizer_config.json").read_text())["chat_template"]
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
    files = export_gguf(root / "model", root / "gguf", kinds, name=family, tokenizer=tok)
    return {"model": model, "tok": tok, "template": tok.chat_template,
            "files": {f["type"]: Path(f["path"]) for f in files}, "records": files}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("gguf")
    return {family: _build(family, root / family, shared_data) for family in CASES}


_LOADED: dict[Path, Any] = {}


def _llama(path: Path) -> Any:
    """llama.cpp's model of ``path``, loaded once per file (loading a 151k-token vocabulary takes a second)."""
    if path not in _LOADED:
        _LOADED[path] = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    return _LOADED[path]


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
    """Each file is of the type asked; a q8_0 matrix holds its weights within q8_0's rounding (read back with the
    gguf package's reference dequantizer); llama.cpp's logits stay within each type's expected error.

    These random models (weights of std 0.15) amplify any perturbation about tenfold: f16's rounding (~0.03% per
    weight) gives 0.1-0.3% on the logits, q8_0's (~0.5% per weight, plus llama.cpp's 8-bit activations) 2-5%,
    q4_k_m's (~5% per weight) ~40%. The bounds are those, with margin; the order f16 < q8_0 < q4_k_m must hold.
    """
    import gguf

    case = exported[family]
    ids = case["tok"](PROMPT)["input_ids"]
    want = _hf_logits(case["model"], ids)
    weight_bound = 0.01  # q8_0: relative RMS error of one matrix's values (8 bits per value, a scale per 32)
    logit_bounds = {"q8_0": 0.08, "q4_k_m": 0.7}
    reference = _down_proj(case["model"])
    errors = {"f16": _relative_error(_cpp_logits(_llama(case["files"]["f16"]), ids), want)}
    for kind in [k for k in ("q8_0", "q4_k_m") if k in case["files"]]:
        llm = _llama(case["files"][kind])
        assert llm.metadata["general.file_type"] == str(int(getattr(gguf.LlamaFileType, GGUF_TYPES[kind])))
        if family in K_QUANT and kind == "q8_0":  # reading a file back in Python is slow (its whole vocabulary)
            tensor = next(t for t in gguf.GGUFReader(case["files"][kind]).tensors
                          if t.name == "blk.0.ffn_down.weight")
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(reference.shape)
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
            assert _relative_error(values, reference) < weight_bound
        errors[kind] = _relative_error(_cpp_logits(llm, ids), want)
        assert errors[kind] < logit_bounds[kind], (kind, errors)
    ordered = [errors[k] for k in ("f16", "q8_0", "q4_k_m") if k in errors]
    assert ordered == sorted(ordered), errors
    sizes = {r["type"]: r["bytes"] for r in case["records"]}
    assert sizes["q8_0"] < 0.7 * sizes["f16"]  # 8.5 bits per weight against 16, plus the same vocabulary


def _down_proj(model: Any) -> np.ndarray:
    """Layer 0's MLP output matrix as llama.cpp stores it, (out, in) (GPT-2's Conv1D is stored transposed)."""
    weight = {n: p for n, p in model.named_parameters()}
    name = next(n for n in weight if n.endswith(("layers.0.mlp.down_proj.weight", "h.0.mlp.c_proj.weight")))
    value = weight[name].detach().float().numpy()
    return value.T if name.endswith("c_proj.weight") else value


@pytest.mark.parametrize("family", list(CASES))
def test_llama_cpp_tokenizes_like_transformers(exported: dict[str, Any], family: str) -> None:
    case = exported[family]
    llm = _llama(case["files"]["q8_0"])
    tok = case["tok"]
    for text in TEXTS:
        want = tok(text)["input_ids"]  # with the special tokens the tokenizer adds (BOS for Llama 2)
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == want, text
        # and back to the text (SentencePiece vocabularies give the "▁" of the first word back as a space)
        assert llm.detokenize(tok(text, add_special_tokens=False)["input_ids"]).decode() in (text, " " + text)
    if family not in SPM:
        got = llm.tokenize(WHITESPACE.encode(), add_bos=False, special=False)
        assert got == tok(WHITESPACE, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", list(CASES))
def test_embedded_chat_template_renders_like_apply_chat_template(exported: dict[str, Any], family: str) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    case = exported[family]
    tok = case["tok"]
    llm = _llama(case["files"]["f16"])
    embedded = llm.metadata["tokenizer.chat_template"]
    assert not re.search(r"\{%-?\s*(end)?generation", embedded)  # training-only tags gone, their text stays
    messages = CHAT if family != "mistral" else CHAT[1:]  # Mistral v1 has no system turn
    formatter = Jinja2ChatFormatter(template=embedded, eos_token=tok.eos_token or "", bos_token=tok.bos_token or "",
                                    add_generation_prompt=True)
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                   chat_template=case["template"])
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


@pytest.mark.parametrize("name", ["saiga", "zephyr", "chatml"])
def test_a_saved_portable_template_keeps_its_ollama_form(name: str) -> None:
    """Output folders save the chat template in its portable form (no generation tags, whitespace made explicit);
    the export must still know it as the registered template, so the Modelfile gets its Ollama TEMPLATE."""
    from impruver import registry
    from impruver.data.templates import ollama_form, portable_template

    source = registry.lookup("templates", name)()
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    assert ollama_form(source, special) is not None
    assert ollama_form(portable_template(source), special) == ollama_form(source, special)


def test_stop_strings_are_the_end_of_turn_chat_and_generation_config_stop_at(shared_data: Path) -> None:
    """One answer to "where does a reply end": the Modelfile's stop string is the renderer's end-of-turn marker,
    also for a template that always appends the next assistant header (some Llama-3 exports), where the text after
    a rendered reply is more than the turn's end."""
    from transformers import AutoTokenizer

    from impruver.chat.generate import end_of_turn
    from impruver.gguf.export import stop_strings

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    tok.chat_template = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
                         "m['content'] + '<|eot_id|>' }}{% endfor %}"
                         "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}")
    assert end_of_turn(tok)[0] == "<|eot_id|>"
    assert stop_strings(tok) == ["<|eot_id|>"]
    tok.chat_template, tok.eos_token = None, "<|endoftext|>"  # no template: the EOS ends a reply
    assert stop_strings(tok) == ["<|endoftext|>"]


def test_every_quantized_type_loads_and_orders_by_its_bits(exported: dict[str, Any], tmp_path: Path) -> None:
    """q6_k, q5_k_m and q4_0 too (the llama case: rows of 256 and 512 values, so k-quants quantize every matrix):
    each file is of its type, and the logit error rises as the bits per weight fall, within each type's bound."""
    import gguf

    from impruver.gguf.export import export_gguf

    case = exported["llama"]
    folder = case["files"]["f16"].parent.parent / "model"
    kinds = ["q6_k", "q5_k_m", "q4_0"]
    files = {r["type"]: r for r in export_gguf(folder, tmp_path, kinds, name="llama", tokenizer=case["tok"])}
    ids = case["tok"](PROMPT)["input_ids"]
    want = _hf_logits(case["model"], ids)
    errors = {k: _relative_error(_cpp_logits(_llama(case["files"][k]), ids), want) for k in ("q8_0", "q4_k_m")}
    for kind in kinds:
        llm = _llama(Path(files[kind]["path"]))
        assert llm.metadata["general.file_type"] == str(int(getattr(gguf.LlamaFileType, GGUF_TYPES[kind])))
        errors[kind] = _relative_error(_cpp_logits(llm, ids), want)
    assert errors["q8_0"] < errors["q6_k"] < errors["q5_k_m"] < errors["q4_k_m"], errors
    # Measured: q8_0 0.05, q6_k 0.17, q5_k_m 0.31, q4_k_m 0.43, q4_0 0.55 (a scale per 32 values, no k-quant mins).
    assert errors["q6_k"] < 0.3 and errors["q5_k_m"] < 0.5 and errors["q4_0"] < 0.8, errors
    sizes = {k: files[k]["bytes"] for k in kinds}
    assert sizes["q4_0"] < sizes["q5_k_m"] < sizes["q6_k"], sizes
