"""Objectives: options and checks, traits, the memory rule, the loss math against closed forms, and sequence
scoring on packed rows (packed == one sequence per row; head on targets == full logits).

The comparison with TRL's implementations is in test_objectives_trl.py.
"""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest
import torch

from impruver.errors import ConfigError
from impruver.objectives import (
    build_objective,
    check_objective,
    model_sequence_logps,
    objective_names,
    objectives,
    sequence_ids_from_positions,
    sequence_logps,
)
from impruver.record import IGNORE_INDEX

VOCAB = 40


def test_every_objective_is_registered_with_its_traits() -> None:
    assert objective_names() == ["dpo", "ipo", "kto", "orpo", "sft", "simpo"]
    traits = {n: (objectives.get(n).needs_reference, objectives.get(n).pairs, objectives.get(n).preference)
              for n in objective_names()}
    assert traits == {"sft": (False, False, False), "dpo": (True, True, True), "ipo": (True, True, True),
                      "orpo": (False, True, True), "simpo": (False, True, True), "kto": (True, False, True)}


def test_options_are_validated_and_every_problem_reported() -> None:
    problems = check_objective("dpo", {"betta": 0.1, "label_smoothing": 0.5, "reference": "copy"})
    keys = sorted(p.key for p in problems)
    assert keys == ["objective.betta", "objective.label_smoothing", "objective.reference"]
    assert "did you mean 'beta'" in next(p.message for p in problems if p.key == "objective.betta")
    with pytest.raises(ConfigError) as err:
        build_objective("simpo", {"beta": -1, "gama": 1})
    assert len(err.value.problems) == 2
    assert "did you mean 'dpo'" in check_objective("dpoo")[0].message


def test_objectives_check_what_their_options_alone_cannot() -> None:
    problems = check_objective("kto", {"reference": "precomputed"}, adapter=True)
    assert [p.key for p in problems] == ["objective.reference"]
    assert check_objective("dpo", {"reference": "precomputed"}) == []
    with pytest.raises(ConfigError):
        build_objective("kto", {"reference": "precomputed"})


def test_defaults_and_the_orpo_lambda_spelling() -> None:
    assert build_objective("dpo").options.beta == 0.1
    assert build_objective("simpo").options.gamma == 1.0
    orpo = build_objective("orpo", {"lambda": 0.2})
    assert orpo.options.lambda_ == 0.2
    assert orpo.options.model_dump(by_alias=True) == {"lambda": 0.2}
    assert check_objective("kto", {"desirable_weight": 1.33, "undesirable_weight": 1.0}) == []


N = 1_000_000


@pytest.mark.parametrize(("name", "options", "adapter", "ref_bytes", "seqs"), [
    ("dpo", {}, False, 2 * N, 2),  # full-parameter DPO: a frozen copy in the compute dtype (2 bytes: bf16)
    ("dpo", {}, True, 0, 2),  # LoRA DPO: the reference is the model with the adapter disabled
    ("dpo", {"reference": "precomputed"}, False, 0, 2),  # reference log-probs computed before training
    ("dpo", {"reference_path": "other/model"}, True, 2 * N, 2),  # a different reference model is a copy
    ("ipo", {}, False, 2 * N, 2),
    ("kto", {}, False, 2 * N, 1),
    ("orpo", {}, False, 0, 2),
    ("simpo", {}, False, 0, 2),
    ("sft", {}, False, 0, 1),
])
def test_memory_rule(name: str, options: dict[str, Any], adapter: bool, ref_bytes: int, seqs: int) -> None:
    memory = build_objective(name, options).memory(n_params=N, adapter=adapter, compute_bytes=2.0)
    assert memory.reference_bytes == ref_bytes
    assert memory.sequences_per_sample == seqs


def test_planning_imports_no_torch() -> None:
    code = ("import sys, impruver.objectives as o; o.check_objective('dpo', {'beta': 1}); "
            "o.build_objective('kto').memory(n_params=1, adapter=False, compute_bytes=2.0); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the loss math against closed forms (plain Python floats) ----

def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


PC, PR, RC, RR = [-4.0, -9.0], [-6.0, -5.0], [-5.0, -8.0], [-5.5, -6.5]  # policy/ref chosen/rejected, 2 pairs
TC, TR = [4, 3], [2, 5]  # answer tokens


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _loss(name: str, options: dict[str, Any], **extra: Any) -> tuple[float, dict[str, float]]:
    loss, metrics = build_objective(name, options).loss(
        _t(PC), _t(PR), _t(RC), _t(RR), chosen_tokens=torch.tensor(TC), rejected_tokens=torch.tensor(TR), **extra)
    return loss.item(), {k: v.item() for k, v in metrics.items()}


def test_dpo_closed_form() -> None:
    beta, eps = 0.5, 0.1
    d = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]
    want = sum(-(1 - eps) * math.log(_sig(beta * x)) - eps * math.log(_sig(-beta * x)) for x in d) / 2
    loss, m = _loss("dpo", {"beta": beta, "label_smoothing": eps})
    assert loss == pytest.approx(want)
    assert m["rewards/chosen"] == pytest.approx(beta * ((PC[0] - RC[0]) + (PC[1] - RC[1])) / 2)
    assert m["rewards/accuracy"] == 0.5  # pair 0: chosen reward 0.5 > -0.25; pair 1: -0.5 < 0.75
    assert m["rewards/margin"] == pytest.approx(beta * sum(d) / 2)


def test_ipo_simpo_orpo_kto_closed_forms() -> None:
    beta = 0.2
    h = [(pc - rc) / tc - (pr - rr) / tr for pc, pr, rc, rr, tc, tr in zip(PC, PR, RC, RR, TC, TR)]
    assert _loss("ipo", {"beta": beta})[0] == pytest.approx(sum((x - 1 / (2 * beta)) ** 2 for x in h) / 2)

    avg_c, avg_r = [p / t for p, t in zip(PC, TC)], [p / t for p, t in zip(PR, TR)]
    simpo = sum(-math.log(_sig(2.0 * (c - r) - 0.7)) for c, r in zip(avg_c, avg_r)) / 2
    assert _loss("simpo", {"beta": 2.0, "gamma": 0.7})[0] == pytest.approx(simpo)

    odds = [(c - r) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(r))) for c, r in zip(avg_c, avg_r)]
    nll = -sum(PC) / sum(TC)
    loss, m = _loss("orpo", {"lambda": 0.3})
    assert loss == pytest.approx(nll - 0.3 * sum(math.log(_sig(o)) for o in odds) / 2)
    assert m["nll"] == pytest.approx(nll)

    # KTO: chosen = desirable answers, rejected = undesirable ones; z0 from the mismatched pairs, clamped at 0
    kl_policy, kl_ref = _t([-3.0, -7.0]), _t([-3.5, -6.0])
    z0 = max(0.0, ((-3.0 + 3.5) + (-7.0 + 6.0)) / 2)
    assert z0 == 0.0
    kl_policy = _t([-3.0, -5.0])
    z0 = ((-3.0 + 3.5) + (-5.0 + 6.0)) / 2
    losses = [1.0 * (1 - _sig(beta * ((pc - rc) - z0))) for pc, rc in zip(PC, RC)]
    losses += [1.5 * (1 - _sig(beta * (z0 - (pr - rr)))) for pr, rr in zip(PR, RR)]
    loss, m = _loss("kto", {"beta": beta, "undesirable_weight": 1.5}, policy_kl_logps=kl_policy, ref_kl_logps=kl_ref)
    assert loss == pytest.approx(sum(losses) / 4)
    assert m["kl"] == pytest.approx(z0)


def test_kto_with_one_kind_of_answer_only() -> None:
    loss, metrics = build_objective("kto").loss(_t(PC), _t([]), _t(RC), _t([]))
    assert loss.item() == pytest.approx(sum(1 - _sig(0.1 * (pc - rc)) for pc, rc in zip(PC, RC)) / 2)
    assert "rewards/rejected" not in metrics and "rewards/margin" not in metrics


def test_reference_free_objectives_need_no_reference_and_the_gradient_reaches_the_policy() -> None:
    chosen, rejected = _t(PC).requires_grad_(), _t(PR).requires_grad_()
    for name in ("orpo", "simpo"):
        loss, _ = build_objective(name).loss(chosen, rejected, None, None, chosen_tokens=torch.tensor(TC),
                                             rejected_tokens=torch.tensor(TR))
        (grad_c, grad_r) = torch.autograd.grad(loss, (chosen, rejected))
        assert (grad_c < 0).all() and (grad_r > 0).all()  # raise the chosen, lower the rejected
    with pytest.raises(ValueError, match="reference"):
        build_objective("dpo").loss(chosen, rejected, None, None)


# ---- sequence scoring on packed rows ----

def tiny_llama(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


SEQS = [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14, 15]), ([16], [17, 18, 19]), ([20, 21, 22, 23], [24]),
        ([25, 26], [27, 28, 29])]  # (prompt, answer) token ids


def layout(rows: list[list[int]], width: int) -> dict[str, Any]:
    """Packed rows of SEQS: positions restart per sequence, shifted targets on the answers only."""
    shape = (len(rows), width)
    ids, pos = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    targets, seq = torch.full(shape, IGNORE_INDEX), torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            prompt, answer = SEQS[s]
            n = len(prompt) + len(answer)
            ids[r, at:at + n] = torch.tensor(prompt + answer)
            pos[r, at:at + n] = torch.arange(n)
            seq[r, at:at + n] = s
            targets[r, at + len(prompt) - 1:at + n - 1] = torch.tensor(answer)
            at += n
        pos[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": pos, "targets": targets, "sequence_ids": seq,
            "n_sequences": len(SEQS)}


def tiny_gpt2(seed: int = 0) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    model.loss_type = "ForCausalLM"  # no loss-lookup warning inside forward
    return model


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_packed_scores_equal_one_sequence_per_row(make: Any) -> None:
    model = make()
    with torch.no_grad():
        packed = model_sequence_logps(model, **layout([[0, 1, 2], [3, 4]], width=20))
        alone = [model_sequence_logps(model, **layout([[s]], width=len(SEQS[s][0]) + len(SEQS[s][1])))
                 for s in range(len(SEQS))]
    assert packed.tokens.tolist() == [len(a) for _, a in SEQS]
    for s, one in enumerate(alone):
        assert one.tokens[s] == packed.tokens[s]
        assert one.sums[s].item() == pytest.approx(packed.sums[s].item(), abs=1e-5)
    assert packed.means.tolist() == pytest.approx((packed.sums / packed.tokens).tolist())
    # a direct reference: log-softmax of the model's logits for sequence 1 run alone
    prompt, answer = SEQS[1]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer])).logits[0]
    logp = torch.log_softmax(logits, -1)
    want = sum(logp[len(prompt) - 1 + k, tok].item() for k, tok in enumerate(answer))
    assert packed.sums[1].item() == pytest.approx(want, abs=1e-5)


def test_head_on_targets_equals_full_logits_and_gradients_match() -> None:
    model = tiny_llama()
    batch = layout([[0, 1, 2], [3, 4]], width=20)
    fast = model_sequence_logps(model, **batch)
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    full = sequence_logps(out.logits, batch["targets"], batch["sequence_ids"], batch["n_sequences"])
    assert torch.allclose(fast.sums, full.sums, atol=1e-5)
    assert torch.equal(fast.tokens, full.tokens)
    head = model.get_output_embeddings().weight
    g_fast, = torch.autograd.grad(fast.sums.sum(), head)
    g_full, = torch.autograd.grad(full.sums.sum(), head)
    assert torch.allclose(g_fast, g_full, atol=1e-5)


def test_sequence_ids_from_position_resets() -> None:
    batch = layout([[0, 1, 2], [3, 4]], width=20)
    ids = sequence_ids_from_positions(batch["position_ids"])
    # row 0: sequences 0, 1, 2 then a padding tail (3); row 1 continues the count: 4, 5, then padding (6)
    assert ids[0].tolist() == [0] * 5 + [1] * 6 + [2] * 4 + [3] * 5
    assert ids[1].tolist() == [4] * 5 + [5] * 5 + [6] * 10
    # used as sequence ids, the padding segments score nothing over no tokens
    with torch.no_grad():
        scores = model_sequence_logps(tiny_llama(), batch["input_ids"], batch["position_ids"], batch["targets"],
                                      ids, n_sequences=7)
    assert scores.tokens.tolist() == [2, 4, 3, 0, 1, 3, 0]
    assert scores.sums[3] == 0 and scores.sums[6] == 0


def test_sources_must_give_the_records_the_objective_trains_on() -> None:
    from impruver import registry
    from impruver.data.preference import produces_of
    from impruver.objectives import data_problems

    produces = {name: produces_of(registry.lookup("formats", fmt))
                for name, fmt in (("pairs", "sharegpt_preference"), ("chats", "saiga"), ("kto", "trl_kto"))}
    assert [p.key for p in data_problems("dpo", produces)] == ["dataset.sources.chats.format",
                                                               "dataset.sources.kto.format"]
    assert [p.key for p in data_problems("kto", produces)] == ["dataset.sources.chats.format"]  # pairs unpair
    assert [p.key for p in data_problems("sft", produces)] == ["dataset.sources.pairs.format",
                                                               "dataset.sources.kto.format"]
    assert "trains on pair records" in data_problems("orpo", {"chats": "conversation"})[0].message
