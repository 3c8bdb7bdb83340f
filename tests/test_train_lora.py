"""LoRA on tiny models (CPU): only adapters train, the base stays bit-identical, the adapter loads with peft,
and the exported merged model gives the base-plus-adapter logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train_support import GPT2_ARCH, LLAMA_ARCH, prepare, tiny_plan, use_files  # noqa: F401

from impruver.train.recipe import run


def _base_folder(folder: Path, tok_dir: Path, arch: dict[str, Any]) -> Path:
    """A 'pretrained' tiny model on disk (random weights saved as a Hugging Face folder)."""
    from transformers import AutoTokenizer

    from impruver.plan import ArchSpec
    from impruver.train.models import config_from_arch

    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config_from_arch(ArchSpec(**arch), vocab_size=len(tok), tokenizer=tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", [GPT2_ARCH, LLAMA_ARCH], ids=["gpt2", "llama"])
def test_lora_trains_only_adapters_and_exports_the_same_logits(tmp_path: Path, use_files, monkeypatch,
                                                                 arch) -> None:
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import impruver.train.outputs as outputs
    from impruver.train import export

    out = prepare(tmp_path / "run")
    base = _base_folder(tmp_path / "base", out / "tok", arch)
    captured: dict[str, Any] = {}
    real_save = outputs.save_model

    def capture(model, tokenizer, plan, *, adapter, state_dict=None):
        captured["model"] = model
        return real_save(model, tokenizer, plan, adapter=adapter, state_dict=state_dict)

    monkeypatch.setattr(outputs, "save_model", capture)
    plan = tiny_plan(out, method="lora", model={"builder": "hf", "path": str(base), "dtype": "float32"},
                     train={"max_steps": 30, "lr": 2e-2}, tokenizer_path=str(base))
    run(plan)

    # Only adapter weights train; every base weight is bit-identical to the folder it was loaded from.
    trained = captured["model"]
    assert {n for n, p in trained.named_parameters() if p.requires_grad} == \
        {n for n, _ in trained.named_parameters() if "lora_" in n}
    saved = load_file(base / "model.safetensors")
    base_params = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                   for n, p in trained.named_parameters() if "lora_" not in n}
    for name, value in saved.items():
        assert torch.equal(base_params[name], value), name
    assert all(p.abs().sum() > 0 for n, p in trained.named_parameters() if "lora_B" in n)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "train"]
    assert losses[-1] < losses[0], losses

    # The output dir is an adapter that peft loads on its base; export merges it into a plain model.
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    result = export.run(plan)
    merged = AutoModelForCausalLM.from_pretrained(result["dest"]).eval()
    # merged/ is ready to serve on its own: the plan, a card, the stop ids, the cache on
    dest = Path(result["dest"])
    assert (dest / "plan.yaml").is_file() and "library_name: transformers" in (dest / "README.md").read_text()
    assert json.loads((dest / "generation_config.json").read_text())["eos_token_id"] is not None
    assert merged.config.use_cache is True
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    ids = torch.randint(4, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, AutoModelForCausalLM.from_pretrained(base)(ids).logits)


def test_lora_on_a_random_weight_base_saves_the_base_beside_the_adapter(tmp_path: Path, use_files) -> None:
    from peft import AutoPeftModelForCausalLM

    out = prepare(tmp_path / "run")
    plan = tiny_plan(out, method="lora", model={"builder": "arch", "arch": GPT2_ARCH, "weights": "random",
                                                "dtype": "float32"},
                     train={"max_steps": 4}, lora={"modules_to_save": ["lm_head"]})
    run(plan)
    assert (out / "base" / "config.json").is_file()
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert model.peft_config["default"].base_model_name_or_path == str((out / "base").resolve())


def test_export_refuses_a_full_model(tmp_path: Path, use_files) -> None:
    from impruver.errors import RunError
    from impruver.train import export

    out = prepare(tmp_path / "run")
    plan = tiny_plan(out, train={"max_steps": 2})
    run(plan)
    with pytest.raises(RunError, match="already standalone"):
        export.run(plan)


def test_tokens_added_by_the_tokenizer_train_and_load_back_exactly(tmp_path: Path, use_files, monkeypatch) -> None:
    """A tokenizer with more tokens than its base: the new rows train with the adapter and load back exactly."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    import impruver.train.outputs as outputs

    out = prepare(tmp_path / "run")
    base = _base_folder(tmp_path / "base", out / "tok", GPT2_ARCH)
    bigger = AutoTokenizer.from_pretrained(base)
    bigger.add_special_tokens({"additional_special_tokens": ["<tool>", "</tool>"]})
    bigger.save_pretrained(tmp_path / "tok2")
    captured = {}
    real_save = outputs.save_model

    def capture(model, tokenizer, plan, *, adapter, state_dict=None):
        captured["model"] = model
        return real_save(model, tokenizer, plan, adapter=adapter, state_dict=state_dict)

    monkeypatch.setattr(outputs, "save_model", capture)
    new_ids = bigger.convert_tokens_to_ids(["<tool>", "</tool>"])
    ids = [1, new_ids[0], 40, 41, new_ids[1], 2] * 3
    rows = [{"input_ids": ids, "labels": ids} for _ in range(8)]
    from test_train_support import write_jsonl

    write_jsonl(out / "data" / "train.jsonl", rows)
    plan = tiny_plan(out, method="lora", model={"builder": "hf", "path": str(base), "dtype": "float32"},
                     train={"max_steps": 5, "lr": 5e-2}, tokenizer_path=str(tmp_path / "tok2"))
    run(plan)
    trained = captured["model"].eval()
    assert any("trainable_tokens" in n for n, p in trained.named_parameters() if p.requires_grad)
    loaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, new_ids[0], 40, new_ids[1], 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits)
