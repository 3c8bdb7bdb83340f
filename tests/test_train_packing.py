"""Packed rows give exactly the loss of their samples run one by one (no attention across samples)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_support import GPT2_ARCH, LLAMA_ARCH, synthetic_rows, write_jsonl

from impruver.plan import ArchSpec
from impruver.train.data import collate, make_rows, read_samples
from impruver.train.loss import TokenLoss
from impruver.train.models import LoadOptions, config_from_arch
from impruver.train.recipe import token_loss_sum


def _model(arch: dict, attn: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = config_from_arch(ArchSpec(**arch), vocab_size=320)
    return TokenLoss(AutoModelForCausalLM.from_config(config, attn_implementation=attn)).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", [GPT2_ARCH, LLAMA_ARCH], ids=["gpt2", "llama"])
def test_packed_loss_equals_token_weighted_unpacked_loss(tmp_path: Path, arch: dict, attn: str) -> None:
    samples = read_samples(write_jsonl(tmp_path / "d.jsonl", synthetic_rows(12, vocab=320, seed=3)), max_len=64)
    model = _model(arch, attn)
    rows = make_rows(samples, seq_len=64, packing=True)
    assert len(rows) < len(samples), "several samples share a row"
    with torch.no_grad():
        packed = collate(samples, rows, pad_id=0, seq_len=64, packed=True)
        packed_mean = token_loss_sum(model, packed, "cpu") / packed["n_targets"]
        one_by_one = [collate(samples, [[i]], pad_id=0, seq_len=None, packed=False) for i in range(len(samples))]
        total = sum(token_loss_sum(model, b, "cpu") for b in one_by_one)
        count = sum(b["n_targets"] for b in one_by_one)
        padded = collate(samples, [[i] for i in range(len(samples))], pad_id=0, seq_len=None, packed=False)
        padded_mean = token_loss_sum(model, padded, "cpu") / padded["n_targets"]
    assert packed["n_targets"] == count
    torch.testing.assert_close(packed_mean, total / count, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_mean, total / count, rtol=1e-5, atol=1e-5)


def test_without_position_ids_samples_would_leak(tmp_path: Path) -> None:
    """The check above can fail: dropping the per-sample positions changes the loss."""
    samples = read_samples(write_jsonl(tmp_path / "d.jsonl", synthetic_rows(12, vocab=320, seed=3)), max_len=64)
    model = _model(GPT2_ARCH, "sdpa")
    rows = make_rows(samples, seq_len=64, packing=True)
    with torch.no_grad():
        packed = collate(samples, rows, pad_id=0, seq_len=64, packed=True)
        right = token_loss_sum(model, packed, "cpu")
        packed["position_ids"] = torch.arange(64).expand(len(rows), 64)
        wrong = token_loss_sum(model, packed, "cpu")
    assert abs(float(right - wrong)) > 1e-3


def test_load_options_keep_fp32_master_weights_under_mixed_precision() -> None:
    from impruver.plan import HardwareSpec, MethodSpec, ModelSpec
    from impruver.train.methods import load_options

    bf16 = HardwareSpec(name="gpu", device="cuda", mixed_precision="bf16")
    model = ModelSpec(path="x", dtype="bfloat16")
    assert load_options(method=MethodSpec(builder="full"), model=model, hardware=bf16) == \
        LoadOptions(dtype="float32", device="cuda")
    assert load_options(method=MethodSpec(builder="lora"), model=ModelSpec(path="x"), hardware=bf16).dtype == \
        "bfloat16"
    assert load_options(method=MethodSpec(builder="scratch"), model=ModelSpec(path="x"),
                        hardware=HardwareSpec()).dtype == "float32"


def _full_logits_loss(model, batch) -> torch.Tensor:
    """The reference: the model's own forward, all logits, then the loss."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=batch.get("attention_mask"), use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             batch["targets"].reshape(-1), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("arch", [GPT2_ARCH, LLAMA_ARCH], ids=["gpt2", "llama"])
def test_head_on_target_positions_only_gives_the_full_logits_loss_and_gradients(tmp_path: Path, arch: dict,
                                                                                 method: str) -> None:
    from impruver.train.methods import Lora, LoraSpec

    samples = read_samples(write_jsonl(tmp_path / "d.jsonl", synthetic_rows(6, vocab=320, seed=5)), max_len=64)
    batch = collate(samples, make_rows(samples, seq_len=64, packing=True), pad_id=0, seq_len=64, packed=True)
    model = _model(arch, "sdpa").model.train()
    if method == "lora":
        model = Lora().wrap(model, LoraSpec(r=4, dropout=0.0, modules_to_save=["lm_head"]))
        torch.nn.init.normal_(next(p for n, p in model.named_parameters() if "lora_B" in n))
    wrapped = TokenLoss(model)
    assert wrapped.head_on_targets
    loss = wrapped(batch["input_ids"], batch["position_ids"], batch["targets"])
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    reference = _full_logits_loss(model, batch)
    expected = torch.autograd.grad(reference, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
