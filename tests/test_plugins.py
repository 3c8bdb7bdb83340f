"""A third-party plugin adds a dataset format, a `dataset=` option, an adapter method (ia3) and a model family
(phi3) with no change to impruver.

The example plugin in tests/plugins/impruver_example_plugin is installed (pip --target, into a temporary folder)
and used through its entry points only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_train_support import use_files  # noqa: F401  (fixture)

PLUGIN = Path(__file__).parent / "plugins" / "impruver_example_plugin"
IMPRUVER = Path(sys.executable).with_name("impruver")


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("plugin-site")
    source = tmp_path_factory.mktemp("plugin-src") / PLUGIN.name
    shutil.copytree(PLUGIN, source)  # build outside the repository: setuptools writes build/ beside the source
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        capture_output=True, text=True, cwd=source.parent,
    )
    assert result.returncode == 0, result.stderr
    assert any(target.glob("impruver_example_plugin-*.dist-info"))
    return target


def run_with_plugin(site: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([str(IMPRUVER), *argv], capture_output=True, text=True, env=env, cwd=cwd)


def test_without_the_plugin_its_names_are_unknown(tmp_path: Path) -> None:
    result = subprocess.run([str(IMPRUVER), "plan", "dataset=example_qa"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2 and "example_qa" in result.stderr


def test_ls_shows_the_plugin_with_its_package(plugin_site: Path, tmp_path: Path) -> None:
    result = run_with_plugin(plugin_site, "ls", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("qa-pairs" in line and "impruver-example-plugin" in line for line in lines)
    assert any("example_qa (impruver-example-plugin)" in line for line in lines)


def test_plugin_dataset_option_plans(plugin_site: Path, tmp_path: Path) -> None:
    result = run_with_plugin(plugin_site, "plan", "--yaml", "dataset=example_qa", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "format: qa-pairs" in result.stdout and "pkg://impruver_example_plugin/data/qa.jsonl" in result.stdout
    bad = run_with_plugin(plugin_site, "plan", "dataset=example_qa", "dataset.sources.example_qa.format=qa-pair",
                          cwd=tmp_path)
    assert bad.returncode == 2 and "did you mean 'qa-pairs'" in bad.stderr


def test_plugin_format_composes_data(plugin_site: Path, tmp_path: Path) -> None:
    result = run_with_plugin(plugin_site, "compose", "dataset=example_qa", f"output_dir={tmp_path / 'run'}",
                             "dataset.dedup.near=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    rows = [json.loads(line) for name in ("train", "val")
            for line in (tmp_path / "run" / "data" / f"{name}.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert all(any(label != -100 for label in row["labels"]) for row in rows)


def test_in_process_refresh(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from impruver import registry

    assert not registry.has("formats", "qa-pairs")
    monkeypatch.syspath_prepend(str(plugin_site))
    registry.refresh_entry_points()
    try:
        assert registry.has("formats", "qa-pairs")
        convert = registry.lookup("formats", "qa-pairs")
        (conversation,) = convert({"question": "Q?", "answer": "A.", "topic": "t"})
        assert [m["role"] for m in conversation["messages"]] == ["system", "user", "assistant"]
        entry = next(e for e in registry.available("formats") if e.name == "qa-pairs")
        assert entry.provider == "impruver-example-plugin"
        from impruver.compose import compose

        composed = compose(["dataset=example_qa"])
        assert composed.config["dataset"]["sources"]["example_qa"]["format"] == "qa-pairs"
    finally:
        monkeypatch.undo()
        registry.refresh_entry_points()
    assert not registry.has("formats", "qa-pairs")


# -- a plugin method (ia3) and a plugin model family (phi3), each one file of the plugin --------------------------


@pytest.fixture
def with_plugin(plugin_site: Path, monkeypatch: pytest.MonkeyPatch):
    """The example plugin importable and its entry points visible in this process (undone afterwards)."""
    from impruver import registry

    monkeypatch.syspath_prepend(str(plugin_site))
    registry.refresh_entry_points()
    yield plugin_site
    monkeypatch.undo()
    registry.refresh_entry_points()


def _tiny_base(folder: Path, tok_dir: Path) -> Path:
    """A 'pretrained' tiny GPT-2 on disk (random weights), with the test tokenizer."""
    import torch
    from test_train_support import GPT2_ARCH
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from impruver.plan import ArchSpec
    from impruver.train.models import config_from_arch

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(1)
    config = config_from_arch(ArchSpec(**GPT2_ARCH), vocab_size=len(tok), tokenizer=tok)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_plugin_ia3_trains_saves_a_peft_adapter_chats_and_exports(with_plugin: Path, tmp_path: Path,
                                                                   use_files) -> None:  # noqa: F811
    import torch
    from peft import AutoPeftModelForCausalLM
    from test_train_support import prepare, tiny_plan

    from impruver.chat.generate import Generation, generation_kwargs, render
    from impruver.chat.load import load
    from impruver.components import method_of
    from impruver.train import export
    from impruver.train.recipe import run

    out = prepare(tmp_path / "run")
    base = _tiny_base(tmp_path / "base", out / "tok")
    plan = tiny_plan(out, method="ia3", model={"builder": "hf", "path": str(base), "dtype": "float32"},
                     train={"max_steps": 6, "lr": 5e-2}, tokenizer_path=str(base))
    assert method_of(plan).adapter and type(plan.method).__name__ == "IA3Options"
    run(plan)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and not (out / "model.safetensors").exists()
    assert "library_name: peft" in (out / "README.md").read_text()

    # The plan's estimate counts exactly the IA3 vectors peft trains on the real model.
    trainable, _ = AutoPeftModelForCausalLM.from_pretrained(out, is_trainable=True).get_nb_trainable_parameters()
    assert plan.memory.trainable_params == trainable > 0
    shown = run_with_plugin(with_plugin, "plan", "--yaml", "preset=demo", "model=local", f"model.path={base}",
                            "method.builder=ia3", "tokenizer.chat_template=saiga", cwd=tmp_path)  # a fresh process
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["memory"]["trainable_params"] == trainable
    adapter = AutoPeftModelForCausalLM.from_pretrained(out).eval()

    # `impruver chat` loads the adapter folder on its base and answers.
    loaded = load(plan)
    assert loaded.found.kind == "adapter" and "IA3" in loaded.describe()
    hello = [{"role": "user", "content": "hi"}]
    reply = Generation(loaded.model, loaded.tokenizer, render(loaded.tokenizer, hello),
                       generation_kwargs(plan.chat.model_copy(update={"do_sample": False, "max_new_tokens": 4})))
    reply.wait()
    assert reply.completion_tokens > 0

    # `impruver export` merges it: the standalone model gives the adapter's logits.
    result = export.run(plan)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(result["dest"]).eval()
    ids = torch.tensor([[5, 9, 17, 33, 2, 60]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, rtol=1e-4, atol=1e-5)


def test_plugin_ia3_options_are_checked_like_a_builtins(with_plugin: Path, tmp_path: Path) -> None:
    from impruver.errors import ConfigError
    from impruver.plan import make_plan

    def problems(**method: object) -> str:
        with pytest.raises(ConfigError) as info:
            make_plan({"model": {"builder": "arch", "chat_template": "saiga",
                                 "arch": {"family": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}},
                       "dataset": {"sources": {"d": {"path": "x.jsonl", "format": "openai"}}},
                       "method": {"builder": "ia3", **method}})
        return str(info.value)

    typo = problems(rank=3)
    assert "method.rank" in typo and "target_modules" in typo  # its own schema names the valid keys
    text = problems(target_modules=["q_proj"], feedforward_modules=["c_fc"])
    assert "method.target_modules[0]" in text and "'q_proj' is not a module of gpt2" in text
    assert "method.feedforward_modules[0]" in text


def test_plugin_family_phi3_trains_from_scratch_and_plans_lora(with_plugin: Path, tmp_path: Path,
                                                               use_files) -> None:  # noqa: F811
    from peft import LoraConfig, get_peft_model
    from test_train_support import prepare, tiny_plan
    from transformers import AutoModelForCausalLM

    from impruver.errors import ConfigError
    from impruver.memory import plan_shape
    from impruver.train.recipe import run

    arch = {"family": "phi3", "n_layer": 2, "n_embd": 32, "n_head": 4, "n_kv_head": 2, "n_inner": 64,
            "n_positions": 128, "vocab_size": 320, "tie_word_embeddings": False}
    out = prepare(tmp_path / "scratch")
    plan = tiny_plan(out, arch=arch, train={"max_steps": 3, "eval_steps": 3, "save_steps": 3})
    summary = run(plan)
    assert summary["steps"] == 3 and summary["train_loss"] is not None
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "phi3"
    real = sum(p.numel() for p in model.parameters())
    assert plan_shape(plan).n_params() == real and plan.memory.trainable_params == real

    lora = tiny_plan(tmp_path / "lora", method="lora", arch=arch, model={
        "builder": "hf", "path": str(out), "dtype": "float32"}, tokenizer_path=str(out))
    assert lora.method.lora.target_modules == "auto"
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["qkv_proj", "o_proj", "gate_up_proj",
                                                                        "down_proj"]))
    assert lora.memory.trainable_params == peft_model.get_nb_trainable_parameters()[0]
    with pytest.raises(ConfigError, match="'q_proj' is not a module of phi3"):
        tiny_plan(tmp_path / "bad", method="lora", arch=arch, lora={"target_modules": ["q_proj"]})
