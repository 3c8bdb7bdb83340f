"""The preference step's speed and memory work: the chunked head (log-probs and gradients equal to log-softmax
through autograd), rows as narrow as the longest sequence, the model's dropout off (the adapter's kept) and the
fused GELU (the same outputs)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from impruver.record import IGNORE_INDEX
from impruver.train import head_logps
from impruver.train.head_logps import head_token_logps
from impruver.train.preference import ROUND, collate_sequences

VOCAB = 50


def reference_logps(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(head(hidden).float(), -1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("bias", [True, False])
def test_frozen_head_logps_and_hidden_gradients_equal_log_softmax(bias: bool, monkeypatch: Any) -> None:
    monkeypatch.setattr(head_logps, "CHUNK_ELEMENTS", VOCAB * 8)  # 8 targets per chunk: 5 chunks, the last short
    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB, bias=bias).requires_grad_(False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (37,))
    upstream = torch.randn(37)  # a DPO-like weighting: each token's gradient is scaled by its sequence's

    got = head_token_logps(head, hidden, targets)
    assert got.grad_fn is not None and "FrozenHead" in type(got.grad_fn).__name__
    (g_got,) = torch.autograd.grad((got * upstream).sum(), hidden)
    want = reference_logps(head, hidden, targets)
    (g_want,) = torch.autograd.grad((want * upstream).sum(), hidden)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(g_got, g_want, atol=1e-5)
    with torch.no_grad():  # the reference pass: log-probs only
        assert torch.allclose(head_token_logps(head, hidden, targets), want, atol=1e-5)


def test_a_trained_head_gets_its_gradient() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB)
    hidden, targets = torch.randn(9, 16, requires_grad=True), torch.randint(0, VOCAB, (9,))
    (g_got,) = torch.autograd.grad(head_token_logps(head, hidden, targets).sum(), head.weight)
    (g_want,) = torch.autograd.grad(reference_logps(head, hidden, targets).sum(), head.weight)
    assert torch.allclose(g_got, g_want, atol=1e-6)


def test_packed_rows_are_as_narrow_as_the_longest_sequence() -> None:
    lengths = [70, 5, 30, 20, 60]
    seqs = [{"input_ids": list(range(1, n + 1)), "labels": [IGNORE_INDEX] + list(range(2, n + 1))} for n in lengths]
    batch = collate_sequences(seqs, pad_id=0, seq_len=1024, packed=True)
    width = batch["input_ids"].shape[1]
    assert width == -(-70 // ROUND) * ROUND < 1024
    # every sequence whole in one row, starting at position 0, and the rows fewer than the sequences
    assert batch["input_ids"].shape[0] < len(seqs)
    starts = (batch["position_ids"] == 0) & (batch["input_ids"] == 1)
    assert int(starts.sum()) == len(seqs)
    ids = batch["sequence_ids"][batch["input_ids"] != 0]
    assert sorted(torch.bincount(ids, minlength=len(seqs)).tolist()) == sorted(lengths)
    with pytest.raises(ValueError, match="longest"):
        collate_sequences(seqs, pad_id=0, seq_len=64, packed=True)


def lora_gpt2(dropout: float = 0.0) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)  # dropouts 0.1
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["c_attn", "c_proj", "c_fc"],
                      fan_in_fan_out=True, init_lora_weights=False)
    return get_peft_model(model, lora)


def test_lora_gradients_through_the_frozen_head_equal_full_logits() -> None:
    from impruver.objectives import model_sequence_logps, sequence_logps
    from impruver.train.loss import targets_only

    model = lora_gpt2().eval()
    assert targets_only(model) and not model.get_output_embeddings().weight.requires_grad
    seqs = [{"input_ids": [3, 4, 5, 6, 7], "labels": [IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7]},
            {"input_ids": [8, 9, 10], "labels": [IGNORE_INDEX, 9, 10]}]
    batch = collate_sequences(seqs, pad_id=0, seq_len=64, packed=True)
    args = (batch["input_ids"], batch["position_ids"], batch["targets"], batch["sequence_ids"], 2)
    lora = [p for p in model.parameters() if p.requires_grad]
    fast = model_sequence_logps(model, *args)
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    full = sequence_logps(out.logits, batch["targets"], batch["sequence_ids"], 2)
    assert torch.allclose(fast.sums, full.sums, atol=1e-5)
    weights = torch.tensor([0.7, -1.3])
    g_fast = torch.autograd.grad((fast.sums * weights).sum(), lora)
    g_full = torch.autograd.grad((full.sums * weights).sum(), lora)
    for a, b in zip(g_fast, g_full, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_model_dropout_off_adapter_dropout_kept_and_reference_deterministic() -> None:
    from impruver.train.pref_recipe import disable_model_dropout

    model = lora_gpt2(dropout=0.2).train()
    assert disable_model_dropout(model) > 0
    rates = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert {p for n, p in rates.items() if "lora_dropout" in n} == {0.2}
    assert {p for n, p in rates.items() if "lora_dropout" not in n} == {0.0}
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad(), model.disable_adapter():  # the reference, in training mode: the same every time
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_fused_gelu_gives_the_same_outputs() -> None:
    from transformers import activations

    from impruver.train.kernels import use_fused_equivalents

    model = lora_gpt2().eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert use_fused_equivalents(model) == 2  # one MLP activation per layer
        after = model(input_ids=ids).logits
    assert not any(type(m) is activations.NewGELUActivation for m in model.modules())
    assert torch.allclose(before, after, atol=1e-5)
