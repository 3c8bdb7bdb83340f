"""Model, method, optimizer and schedule builders (registered names, no training)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from test_train_support import GPT2_ARCH, LLAMA_ARCH, make_tokenizer

from impruver import registry
from impruver.errors import RunError
from impruver.plan import ArchSpec, ModelSpec
from impruver.train.methods import LoraSpec


class TinyLM(torch.nn.Module):
    """A user's own model class (used through model.class_path)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.embed = torch.nn.Embedding(config.vocab_size, 16)
        self.head = torch.nn.Linear(16, config.vocab_size)

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=False):
        return self.head(self.embed(input_ids))


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_registered_names() -> None:
    assert registry.names("models") == ["arch", "custom", "hf"]
    assert registry.names("methods") == ["full", "lora", "qlora", "scratch"]
    assert set(registry.names("optimizers")) == {"adamw", "adamw_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"}
    assert set(registry.names("schedulers")) == {"cosine", "linear", "constant"}


def test_arch_builds_each_family_with_the_tokenizer_vocabulary(tok) -> None:
    build = registry.lookup("models", "arch")
    for arch in (GPT2_ARCH, LLAMA_ARCH, {**LLAMA_ARCH, "family": "mistral", "sliding_window": 64},
                 {**LLAMA_ARCH, "family": "qwen2"}):
        model = build(spec=ModelSpec(builder="arch", arch=ArchSpec(**arch)), tokenizer=tok)
        assert model.config.model_type == arch["family"]
        assert model.get_input_embeddings().weight.shape[0] == len(tok)
        assert model.config._attn_implementation == "sdpa"  # auto without flash-attention / CUDA


def test_hf_loads_a_folder_and_random_weights_rebuild_its_exact_architecture(tmp_path: Path, tok) -> None:
    arch = registry.lookup("models", "arch")(spec=ModelSpec(builder="arch", arch=ArchSpec(**GPT2_ARCH)),
                                            tokenizer=tok)
    arch.save_pretrained(tmp_path / "m")
    hf = registry.lookup("models", "hf")
    loaded = hf(spec=ModelSpec(path=str(tmp_path / "m")), tokenizer=tok)
    assert all(torch.equal(a, b) for a, b in zip(arch.state_dict().values(), loaded.state_dict().values()))
    random = hf(spec=ModelSpec(path=str(tmp_path / "m"), weights="random"), tokenizer=tok)
    assert random.config.to_diff_dict().keys() >= {"n_layer", "n_embd"}
    assert [p.shape for p in random.parameters()] == [p.shape for p in arch.parameters()]
    assert not torch.equal(random.transformer.h[0].attn.c_attn.weight, arch.transformer.h[0].attn.c_attn.weight)


def test_added_special_tokens_resize_the_embeddings(tmp_path: Path, tok) -> None:
    model = registry.lookup("models", "arch")(spec=ModelSpec(builder="arch", arch=ArchSpec(**GPT2_ARCH)),
                                              tokenizer=tok)
    model.save_pretrained(tmp_path / "m")
    bigger = make_tokenizer(tmp_path / "tok2")
    bigger.add_special_tokens({"additional_special_tokens": ["<tool>", "</tool>"]})
    loaded = registry.lookup("models", "hf")(spec=ModelSpec(path=str(tmp_path / "m")), tokenizer=bigger)
    assert loaded.get_input_embeddings().weight.shape[0] == len(bigger) == len(tok) + 2


def test_an_offline_hub_id_fails_at_once_with_the_fix() -> None:
    started = time.perf_counter()
    with pytest.raises(RunError, match="HF_HUB_OFFLINE.*model.path=DIR"):
        registry.lookup("models", "hf")(spec=ModelSpec(path="no-such-org/no-such-model"))
    assert time.perf_counter() - started < 5


def test_trust_remote_code_reaches_transformers_only_when_set(tmp_path: Path, tok, monkeypatch) -> None:
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    registry.lookup("models", "arch")(spec=ModelSpec(builder="arch", arch=ArchSpec(**GPT2_ARCH)),
                                      tokenizer=tok).save_pretrained(tmp_path / "m")
    hf = registry.lookup("models", "hf")
    hf(spec=ModelSpec(path=str(tmp_path / "m")), tokenizer=tok)
    hf(spec=ModelSpec(path=str(tmp_path / "m"), trust_remote_code=True), tokenizer=tok)
    assert seen == [False, True]


def test_custom_class_by_explicit_path(tok) -> None:
    spec = ModelSpec(builder="custom", class_path="test_train_builders:TinyLM", arch=ArchSpec(**GPT2_ARCH))
    model = registry.lookup("models", "custom")(spec=spec, tokenizer=tok)
    assert type(model).__name__ == "TinyLM" and model.embed.num_embeddings == len(tok)
    with pytest.raises(RunError, match="cannot import 'nowhere.module:Model'"):
        registry.lookup("models", "custom")(spec=ModelSpec(builder="custom", class_path="nowhere.module:Model"))


@pytest.mark.parametrize("arch,targets", [(GPT2_ARCH, {"c_attn", "c_proj", "c_fc"}),
                                          (LLAMA_ARCH, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"})])
def test_lora_auto_targets_per_architecture(tok, arch, targets) -> None:
    model = registry.lookup("models", "arch")(spec=ModelSpec(builder="arch", arch=ArchSpec(**arch)), tokenizer=tok)
    peft_model = registry.lookup("methods", "lora").wrap(model, LoraSpec(r=4, use_rslora=True, use_dora=True))
    config = peft_model.peft_config["default"]
    assert set(config.target_modules) == targets
    assert config.fan_in_fan_out == (arch["family"] == "gpt2")  # GPT-2's Conv1D stores weights transposed
    assert config.use_rslora and config.use_dora
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_with_a_module_the_model_lacks_is_a_run_error(tok) -> None:
    model = registry.lookup("models", "arch")(spec=ModelSpec(builder="arch", arch=ArchSpec(**GPT2_ARCH)),
                                              tokenizer=tok)
    with pytest.raises(RunError, match="method.lora"):
        registry.lookup("methods", "lora").wrap(model, LoraSpec(target_modules=["q_proj"]))


def test_optimizers_decay_only_matrices_and_8bit_needs_bitsandbytes(tok) -> None:
    from impruver.train.optim import param_groups

    model = registry.lookup("models", "arch")(spec=ModelSpec(builder="arch", arch=ArchSpec(**GPT2_ARCH)),
                                              tokenizer=tok)
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])
    for name in ("adamw", "adamw_fused", "sgd"):
        opt = registry.lookup("optimizers", name)(params=param_groups(model, 0.1), lr=1e-3)
        assert opt.param_groups[0]["lr"] == 1e-3
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(RunError, match="bitsandbytes"):
            registry.lookup("optimizers", "paged_adamw_8bit")(params=param_groups(model, 0.1), lr=1e-3)


def _lrs(name: str, steps: int = 10, **kwargs) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = registry.lookup("schedulers", name)(optimizer=opt, num_training_steps=steps, **kwargs)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules_warm_up_then_decay_to_the_floor() -> None:
    cosine = _lrs("cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert cosine[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:])) and cosine[-1] > 0.1
    assert _lrs("cosine", steps=1000, min_lr_ratio=0.1)[-1] == pytest.approx(0.1, abs=1e-4)
    linear = _lrs("linear", warmup_steps=0, min_lr_ratio=0.0)
    assert linear == pytest.approx([1 - i / 10 for i in range(10)])
    assert _lrs("constant", warmup_steps=4) == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 7)


def test_a_missing_reporter_package_stops_before_training() -> None:
    from impruver.train.metrics import check_reporters

    missing = [name for name in ("wandb", "tensorboard") if importlib.util.find_spec(name) is None]
    for name in missing:
        with pytest.raises(RunError, match=f"pip install {name}"):
            check_reporters([name])
    check_reporters([n for n in ("wandb", "tensorboard") if n not in missing])
