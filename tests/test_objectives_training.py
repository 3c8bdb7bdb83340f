"""Preference batches and PreferenceLoss: packed == padded, the adapter-disabled reference is the base model,
precomputed reference log-probs give the same loss, KTO's batch, and a few DPO / ORPO steps raise the margin."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from impruver.objectives import build_objective
from impruver.record import IGNORE_INDEX
from impruver.train.preference import (
    PreferenceLoss,
    collate_labelled,
    collate_pairs,
    collate_sequences,
    precompute_reference,
    score,
)

VOCAB = 40


def tiny_llama(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tokenized(prompt: list[int], answer: list[int]) -> dict[str, list[int]]:
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def make_pairs(n: int, seed: int = 3) -> list[dict[str, Any]]:
    """Pairs whose chosen answers count up from the prompt's last token and rejected ones repeat it."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        prompt = torch.randint(3, 30, (2 + i % 3,), generator=g).tolist()
        start = prompt[-1]
        chosen = [start + k for k in range(1, 4 + i % 2)]
        rejected = [start] * (3 + i % 3)
        pairs.append({"chosen": tokenized(prompt, chosen), "rejected": tokenized(prompt, rejected)})
    return pairs


def test_packed_pairs_give_the_loss_of_padded_pairs() -> None:
    policy, ref = tiny_llama(0), tiny_llama(1)
    loss_fn = PreferenceLoss(build_objective("dpo", {"beta": 0.5}), policy, reference=ref)
    pairs = make_pairs(5)
    packed = collate_pairs(pairs, pad_id=0, seq_len=24, packed=True)
    padded = collate_pairs(pairs, pad_id=0, seq_len=None, packed=False)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # several sequences share a row
    with torch.no_grad():
        (loss_p, m_p), (loss_u, m_u) = loss_fn(packed), loss_fn(padded)
    assert loss_p.item() == pytest.approx(loss_u.item(), abs=1e-5)
    for key in m_p:
        assert m_p[key].item() == pytest.approx(m_u[key].item(), abs=1e-5), key


def test_precomputed_reference_equals_the_reference_model() -> None:
    policy, ref = tiny_llama(0), tiny_llama(1)
    batch = collate_pairs(make_pairs(4), pad_id=0, seq_len=32, packed=True)
    with torch.no_grad():
        live, _ = PreferenceLoss(build_objective("ipo"), policy, reference=ref)(batch)
        stored = {**batch, "ref_sums": score(ref, batch).sums}
        pre, _ = PreferenceLoss(build_objective("ipo", {"reference": "precomputed"}), policy)(stored)
    assert pre.item() == pytest.approx(live.item(), abs=1e-6)


def test_reference_log_probs_precomputed_once_and_stored_with_the_pairs() -> None:
    policy, start = tiny_llama(0), tiny_llama(1)
    pairs = make_pairs(5)
    stored = precompute_reference(start, pairs, pad_id=0, seq_len=32, batch_size=2)
    assert all(len(p["ref_logps"]) == 2 for p in stored)
    batch = collate_pairs(stored[1:4], pad_id=0, seq_len=32, packed=True)
    with torch.no_grad():
        pre, _ = PreferenceLoss(build_objective("dpo", {"reference": "precomputed"}), policy)(batch)
        live, _ = PreferenceLoss(build_objective("dpo"), policy, reference=start)(
            collate_pairs(pairs[1:4], pad_id=0, seq_len=32, packed=True))
    assert pre.item() == pytest.approx(live.item(), abs=1e-5)


def test_adapter_reference_is_the_base_model_without_a_copy() -> None:
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(0)
    frozen_base = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    loss_fn = PreferenceLoss(build_objective("dpo"), model)  # no reference given: the adapter is disabled
    batch = collate_pairs(make_pairs(4), pad_id=0, seq_len=32, packed=True)
    with torch.no_grad():
        loss, metrics = loss_fn(batch)
    assert loss.item() == pytest.approx(0.693147, abs=1e-5)  # a fresh adapter (B = 0) is the reference: log 2
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    with torch.no_grad():
        _, metrics = loss_fn(batch)
        n = batch["n_pairs"]
        ref = score(frozen_base, batch).sums
        policy = score(model, batch).sums
    assert metrics["rewards/chosen"].item() == pytest.approx(0.1 * (policy[:n] - ref[:n]).mean().item(), abs=1e-5)
    assert abs(metrics["rewards/chosen"].item()) > 1e-3


def test_full_training_without_a_reference_is_refused() -> None:
    loss_fn = PreferenceLoss(build_objective("dpo"), tiny_llama())
    with pytest.raises(ValueError, match="needs a reference"):
        loss_fn(collate_pairs(make_pairs(2), pad_id=0, seq_len=32, packed=True))
    with pytest.raises(ValueError, match="not a preference objective"):
        PreferenceLoss(build_objective("sft"), tiny_llama())


def test_kto_batch_scores_each_answer_and_the_mismatched_pairs() -> None:
    policy, ref = tiny_llama(0), tiny_llama(1)
    pairs = make_pairs(3)
    records = [{"completion": p["chosen"], "label": True} for p in pairs[:2]]
    records.append({"completion": pairs[2]["rejected"], "label": False})
    batch = collate_labelled(records, pad_id=0, seq_len=24, packed=True)
    kl_0 = batch["kl"]  # prompt 0 + answer 1
    with torch.no_grad():
        loss, metrics = PreferenceLoss(build_objective("kto", {"beta": 0.5}), policy, reference=ref)(batch)
        # by hand, one sequence per row
        alone = [r["completion"] for r in records]
        prompt0 = pairs[0]["chosen"]["input_ids"][:len(pairs[0]["chosen"]["input_ids"]) - 3]
        answer1 = [t for t in pairs[1]["chosen"]["labels"] if t != IGNORE_INDEX]
        mismatched = tokenized(prompt0, answer1)
        seqs = collate_sequences([*alone, mismatched], pad_id=0, seq_len=None, packed=False)
        p, r = score(policy, seqs).sums, score(ref, seqs).sums
    assert kl_0["n_sequences"] == 3
    assert score(policy, kl_0).sums[0].item() == pytest.approx(p[3].item(), abs=1e-5)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.5 * (p[:2] - r[:2]).mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.5 * (p[2] - r[2]).item(), abs=1e-5)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(("name", "options"), [("dpo", {"beta": 0.5}), ("orpo", {"lambda": 0.5})])
def test_a_few_steps_raise_the_margin_and_the_accuracy(name: str, options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    policy = tiny_llama(0).train()
    objective = build_objective(name, options)
    reference = copy.deepcopy(policy) if objective.needs_reference else None
    loss_fn = PreferenceLoss(objective, policy, reference=reference)
    batch = collate_pairs(make_pairs(6), pad_id=0, seq_len=32, packed=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    with torch.no_grad():
        _, start = loss_fn(batch)
    for _ in range(15):
        loss, _ = loss_fn(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        _, end = loss_fn(batch)
    assert end["rewards/margin"].item() > start["rewards/margin"].item() + 0.1
    assert end["rewards/accuracy"].item() == 1.0
    assert end["loss"].item() < start["loss"].item()
