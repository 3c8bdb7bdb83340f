"""``impruver export --gguf`` on what runs leave: a model trained from scratch with impruver's own BPE (the demo's
kind of output), a LoRA run on it (merged first, then converted), and the command line. Every file is loaded by
llama.cpp and its f16 logits are compared with transformers on the exported model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import llama_cpp  # never skipped: a missing binding fails the run
import numpy as np
import pytest
from test_train_support import make_tokenizer, prepare, tiny_plan

from impruver.plan import make_plan

TEXT = "Привет, мир! hello world, how are you?"


def _logits_close(folder: Path, gguf_file: Path, tokenizer_dir: Path) -> None:
    """llama.cpp's logits of ``gguf_file`` equal transformers' on ``folder`` (f16 rounding apart), and the ids
    llama.cpp tokenizes are the tokenizer's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(TEXT)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(gguf_file), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    assert llm.tokenize(TEXT.encode(), add_bos=True, special=False) == ids
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(folder).eval()(torch.tensor([ids])).logits[0].numpy()
    assert np.sqrt(np.mean((got - want) ** 2)) < 0.01 * np.std(want)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """{scratch, lora}: plans of a from-scratch GPT-2 run (impruver's BPE, saiga) and of a LoRA run on it."""
    from impruver.train.recipe import run

    root = tmp_path_factory.mktemp("gguf_runs")
    mp = pytest.MonkeyPatch()
    try:
        _use_files(mp)
        scratch = prepare(root / "scratch")
        plan = tiny_plan(scratch, train={"max_steps": 6, "eval_steps": 6, "save_steps": 6})
        run(plan)
        lora_out = prepare(root / "lora")
        lora = tiny_plan(lora_out, method="lora", model={"builder": "hf", "path": str(scratch), "dtype": "float32"},
                         train={"max_steps": 6, "eval_steps": 6, "save_steps": 6, "lr": 5e-2},
                         tokenizer_path=str(scratch))
        run(lora)
    finally:
        mp.undo()
    return {"scratch": plan, "lora": lora}


def _use_files(mp: pytest.MonkeyPatch) -> None:
    """What the ``use_files`` fixture does, for a module-scoped fixture (data written by the test, no compose)."""
    from transformers import AutoTokenizer

    import impruver.data.pipeline as pipeline

    mp.setattr(pipeline, "ensure_composed", lambda plan, **_: None)
    mp.setattr(pipeline, "load_composed_tokenizer", lambda plan: AutoTokenizer.from_pretrained(plan.tokenizer.path))


def test_a_model_trained_from_scratch_exports_f16_and_q8_0(runs: dict[str, Any]) -> None:
    from impruver.train import export

    plan = runs["scratch"]
    result = export.run(plan, gguf="f16,q8_0")
    out = Path(plan.output_dir)
    name = out.resolve().name
    assert result["gguf"] == [str(out / "gguf" / f"{name}-f16.gguf"), str(out / "gguf" / f"{name}-q8_0.gguf")]
    assert not (out / "merged").exists()  # a full model is converted as it is
    _logits_close(out, Path(result["gguf"][0]), out)
    assert llama_cpp.Llama(model_path=result["gguf"][1], vocab_only=True, verbose=False).n_vocab() == 320
    modelfile = (out / "gguf" / f"{name}-q8_0.Modelfile").read_text()
    assert f"FROM ./{name}-q8_0.gguf" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert list((out / "gguf").glob(".*")) == []  # no temporary file left


def test_a_lora_run_is_merged_then_exported(runs: dict[str, Any]) -> None:
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from impruver.train import export

    plan = runs["lora"]
    out = Path(plan.output_dir)
    result = export.run(plan, gguf="q8_0,f16")
    assert Path(result["dest"]) == out / "merged"
    files = [Path(p) for p in result["gguf"]]
    assert [f.name.rsplit("-", 1)[1] for f in files] == ["q8_0.gguf", "f16.gguf"]
    _logits_close(out / "merged", files[1], out / "merged")
    # the merged model is the adapter on its base, so llama.cpp's file gives the adapter's logits too
    ids = torch.tensor([[5, 17, 40, 90, 200]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(ids).logits
        adapter = AutoPeftModelForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.testing.assert_close(merged, adapter, rtol=1e-4, atol=1e-4)
    llama_cpp.Llama(model_path=str(files[0]), n_ctx=32, verbose=False)  # the q8_0 file loads


def test_merge_keeps_the_base_dtype(tmp_path: Path) -> None:
    """A bf16 base stays bf16 when its adapter is merged (then bf16 weights are quantized from a bf16 GGUF)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from impruver.gguf.write import source_of
    from impruver.train.export import load_merged

    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, vocab_size=320)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)  # the adapter names it
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    make_tokenizer(tmp_path / "adapter")
    merged, _ = load_merged(tmp_path / "adapter")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    merged.save_pretrained(tmp_path / "merged")
    assert source_of(tmp_path / "merged").weights_dtype == "bf16"
    with safe_open(tmp_path / "merged" / "model.safetensors", framework="pt") as f:
        assert all(f.get_slice(n).get_dtype() == "BF16" for n in f.keys())


def test_the_plan_section_and_the_flag(runs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """``export.gguf`` is validated with the valid types named and used when --gguf is not given (by
    ``impruver export`` and at the end of the main job); ``--gguf`` is a flag of the export stage (from its
    keyword-only parameter)."""
    from impruver import jobs
    from impruver.errors import ConfigError
    from impruver.jobs import stage_flags
    from impruver.train import export

    plan = runs["scratch"]
    config = {**plan.to_dict(), "export": {"gguf": ["f16", "q9_0"]}}
    config.pop("version"), config.pop("choices"), config.pop("memory")
    with pytest.raises(ConfigError, match=r"export.gguf.*did you mean 'q8_0'.*q4_k_m"):
        make_plan(config)
    assert stage_flags("export")["gguf"] is True  # --gguf takes a value
    with pytest.raises(ConfigError, match="q4_k_m"):
        export.run(plan, gguf="f16,q4_km")
    configured = plan.model_copy(update={"export": plan.export.model_copy(update={"gguf": ["f16"]})})
    name = Path(plan.output_dir).resolve().name
    assert [Path(p).name for p in export.run(configured)["gguf"]] == [f"{name}-f16.gguf"]
    monkeypatch.setattr(jobs, "train_job", lambda plan, force=False: {"final_loss": 1.0})  # trained already
    (Path(plan.output_dir) / "gguf" / f"{name}-f16.gguf").unlink()
    result = jobs.main_job(configured)
    assert result["final_loss"] == 1.0 and Path(result["gguf"][0]).is_file()


def test_a_family_without_gguf_traits_is_refused_naming_those_that_have_them(tmp_path: Path) -> None:
    import json

    from impruver.errors import RunError
    from impruver.gguf.write import source_of

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(RunError, match=r"'bert' has no GGUF traits.*gpt2, llama, mistral, qwen2, qwen3"):
        source_of(tmp_path)
