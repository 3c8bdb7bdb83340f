"""Each preference objective equals TRL's implementation of the same objective on a fixed batch.

The reference is TRL's own loss code, run on a tiny Llama built in code (fixed seeds, fp32, CPU):

* dpo, ipo, kto: ``DPOTrainer._compute_loss`` / ``KTOTrainer._compute_loss`` (TRL 1.16 keeps these losses inline
  in those methods), which also score the sequences themselves: with the model patched by TRL's
  ``add_fused_lm_head`` and right-padded [chosen; rejected] rows. So the comparison covers impruver's packed
  scoring (:func:`model_sequence_logps`) as well as the loss math.
* orpo: ``ORPOTrainer.get_batch_loss_metrics`` (TRL's forward, log-probs and odds-ratio loss) with one-token
  prompts, where TRL's NLL over "prompt + answer" equals impruver's NLL over the answer (the first token is never
  a target); ``odds_ratio_loss`` with longer prompts for the odds-ratio term.
* simpo: ``CPOTrainer.cpo_loss`` (``loss_type="simpo"``, ``cpo_alpha=0``: no NLL term, as in the SimPO paper) on
  log-probs averaged by TRL's ``get_batch_logps``.

The trainers are not constructed (that needs a dataset, tokenizer and Trainer setup): ``object.__new__`` gives
an instance and the test sets exactly the attributes the loss code reads (`_trl`). TRL's ``sigmoid`` DPO has
no label smoothing since 1.x; conservative DPO (label smoothing) is compared with its ``aot`` loss on one pair
at a time, which is exactly cDPO then (sorting a single value changes nothing).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from impruver.objectives import build_objective, model_sequence_logps
from impruver.record import IGNORE_INDEX

trl = pytest.importorskip("trl")
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

VOCAB = 48
ATOL = 2e-5


def tiny_llama(seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    # TRL's fused head; outputs TRL's trainers log besides the log-probs
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return tiny_llama(0), tiny_llama(1)  # policy, reference


def _ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def make_pairs(prompt_lengths: list[int], seed: int = 7) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token lists with answers of different lengths."""
    g = torch.Generator().manual_seed(seed)
    return [(_ids(g, p), _ids(g, 3 + 2 * i), _ids(g, 6 - i)) for i, p in enumerate(prompt_lengths)]


def packed(seqs: list[tuple[list[int], list[int]]], rows: list[list[int]], width: int) -> dict[str, Any]:
    """impruver's packed layout: several (prompt, answer) sequences per row, position_ids restarting at each,
    shifted targets on the answer only, sequence_ids naming each position's sequence; a padding tail restarts
    its positions at 0 (as impruver.train.data.collate does)."""
    shape = (len(rows), width)
    ids, pos = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    targets, seq_ids = torch.full(shape, IGNORE_INDEX), torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            prompt, answer = seqs[s]
            tokens = prompt + answer
            n = len(tokens)
            ids[r, at:at + n] = torch.tensor(tokens)
            pos[r, at:at + n] = torch.arange(n)
            seq_ids[r, at:at + n] = s
            targets[r, at + len(prompt) - 1:at + n - 1] = torch.tensor(answer)  # token t+1 is the target at t
            at += n
        pos[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": pos, "targets": targets, "sequence_ids": seq_ids,
            "n_sequences": len(seqs)}


def padded(seqs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """TRL's layout: one right-padded row per sequence, completion_mask on the answer tokens."""
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (prompt, answer) in enumerate(seqs):
        n = len(prompt) + len(answer)
        ids[i, :n] = torch.tensor(prompt + answer)
        mask[i, :n] = 1
        completion[i, len(prompt):n] = 1
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}


def impruver_scores(model: Any, seqs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs and answer lengths of ``seqs``, scored packed three to a row."""
    rows = [list(range(i, min(i + 3, len(seqs)))) for i in range(0, len(seqs), 3)]
    width = max(sum(len(seqs[s][0]) + len(seqs[s][1]) for s in row) for row in rows) + 2
    with torch.no_grad():
        scores = model_sequence_logps(model, **packed(seqs, rows, width))
    return scores.sums, scores.tokens


def _trl(cls: type, **attrs: Any) -> Any:
    """A TRL trainer instance without its constructor: only the attributes its loss code reads."""
    trainer = object.__new__(cls)
    identity = lambda x: x  # noqa: E731  one process: gathering is the identity
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity,
                                  unwrap_model=identity)
    trainer.__dict__.update(accelerator=accelerator, aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1,
                            _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                            args=SimpleNamespace(gradient_checkpointing_kwargs=None), **attrs)
    return trainer


def _pair_inputs(pairs: list[tuple[list[int], list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """Sequences in TRL's [chosen...; rejected...] order."""
    return [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]


def impruver_pair_loss(name: str, options: dict[str, Any], models: tuple[Any, Any],
                       pairs: list[tuple[list[int], list[int], list[int]]]) -> tuple[torch.Tensor, dict[str, Any]]:
    policy, ref = models
    seqs = _pair_inputs(pairs)
    n = len(pairs)
    logps, tokens = impruver_scores(policy, seqs)
    ref_logps, _ = impruver_scores(ref, seqs)
    objective = build_objective(name, options)
    return objective.loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], chosen_tokens=tokens[:n],
                          rejected_tokens=tokens[n:])


def trl_dpo(models: tuple[Any, Any], pairs: list[tuple[list[int], list[int], list[int]]], *, loss_type: str,
            beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, list[float]]]:
    from trl import DPOTrainer

    policy, ref = models
    trainer = _trl(DPOTrainer, model=policy, ref_model=ref, ld_alpha=None, precompute_ref_logps=False,
                   f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
                   label_smoothing=label_smoothing, use_weighting=False)
    with torch.no_grad():
        loss = trainer._compute_loss(policy, padded(_pair_inputs(pairs)), return_outputs=False)
    return loss, trainer._metrics["eval"]


PAIRS = [2, 5, 1, 4]  # prompt lengths of the fixed batch


def _same_metrics(ours: dict[str, torch.Tensor], theirs: dict[str, list[float]]) -> None:
    for mine, trls in (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                       ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies"),
                       ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")):
        assert ours[mine].item() == pytest.approx(theirs[trls][-1], abs=ATOL), mine


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_equals_trl(models: tuple[Any, Any], beta: float) -> None:
    pairs = make_pairs(PAIRS)
    loss, metrics = impruver_pair_loss("dpo", {"beta": beta}, models, pairs)
    trl_loss, trl_metrics = trl_dpo(models, pairs, loss_type="sigmoid", beta=beta)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=ATOL)
    assert loss.item() != pytest.approx(0.6931, abs=1e-3)  # the policy differs from the reference: a real test
    _same_metrics(metrics, trl_metrics)


def test_conservative_dpo_equals_trl(models: tuple[Any, Any]) -> None:
    pairs = make_pairs(PAIRS)
    loss, _ = impruver_pair_loss("dpo", {"beta": 0.3, "label_smoothing": 0.2}, models, pairs)
    per_pair = [trl_dpo(models, [p], loss_type="aot", beta=0.3, label_smoothing=0.2)[0] for p in pairs]
    assert loss.item() == pytest.approx(torch.stack(per_pair).mean().item(), abs=ATOL)
    plain, _ = impruver_pair_loss("dpo", {"beta": 0.3}, models, pairs)
    assert abs(loss.item() - plain.item()) > 1e-3  # the smoothing changes the loss


def test_ipo_equals_trl(models: tuple[Any, Any]) -> None:
    pairs = make_pairs(PAIRS)
    loss, metrics = impruver_pair_loss("ipo", {"beta": 0.2}, models, pairs)
    trl_loss, trl_metrics = trl_dpo(models, pairs, loss_type="ipo", beta=0.2)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=ATOL)
    _same_metrics(metrics, trl_metrics)


def test_simpo_equals_trl(models: tuple[Any, Any]) -> None:
    from trl.experimental.cpo import CPOTrainer

    policy, _ = models
    pairs = make_pairs(PAIRS)
    loss, metrics = impruver_pair_loss("simpo", {"beta": 2.0, "gamma": 0.8}, models, pairs)
    inputs = padded(_pair_inputs(pairs))
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    with torch.no_grad():
        logits = policy(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    avg = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    n = len(pairs)
    trainer = _trl(CPOTrainer, alpha=0.0, loss_type="simpo", simpo_gamma=0.8, beta=2.0, label_smoothing=0.0)
    losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(avg[:n], avg[n:])
    assert loss.item() == pytest.approx(losses.mean().item(), abs=ATOL)
    assert metrics["rewards/chosen"].item() == pytest.approx(chosen_rewards.mean().item(), abs=ATOL)
    assert metrics["rewards/rejected"].item() == pytest.approx(rejected_rewards.mean().item(), abs=ATOL)
    assert metrics["logps/chosen"].item() == pytest.approx(avg[:n].mean().item(), abs=ATOL)


def _orpo_batch(pairs: list[tuple[list[int], list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """ORPOTrainer's tokenized batch: prompt_/chosen_/rejected_ input_ids, attention_mask and labels."""
    chosen, rejected = padded([(p, c) for p, c, _ in pairs]), padded([(p, r) for p, _, r in pairs])
    batch = {}
    for side, t in (("chosen", chosen), ("rejected", rejected)):
        batch[f"{side}_input_ids"] = t["input_ids"]
        batch[f"{side}_attention_mask"] = t["attention_mask"]
        batch[f"{side}_labels"] = t["input_ids"].masked_fill(t["completion_mask"] == 0, IGNORE_INDEX)
    return batch


def test_orpo_equals_trl(models: tuple[Any, Any]) -> None:
    from trl.experimental.orpo import ORPOTrainer

    policy, _ = models
    pairs = make_pairs([1, 1, 1, 1])  # one-token prompts: TRL's NLL over prompt + answer is the answer's NLL
    loss, metrics = impruver_pair_loss("orpo", {"lambda": 0.25}, models, pairs)
    trainer = _trl(ORPOTrainer, beta=0.25, is_encoder_decoder=False, padding_value=0)
    with torch.no_grad():
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(policy, _orpo_batch(pairs), train_eval="train")
    assert loss.item() == pytest.approx(trl_loss.item(), abs=ATOL)
    assert metrics["nll"].item() == pytest.approx(trl_metrics["nll_loss"], abs=ATOL)
    assert metrics["log_odds"].item() == pytest.approx(trl_metrics["log_odds_chosen"], abs=ATOL)
    for mine, theirs in (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies"),
                         ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")):
        assert metrics[mine].item() == pytest.approx(trl_metrics[theirs], abs=ATOL), mine


def test_orpo_odds_ratio_term_equals_trl_with_long_prompts(models: tuple[Any, Any]) -> None:
    from trl.experimental.orpo import ORPOTrainer

    policy, _ = models
    pairs = make_pairs(PAIRS)
    n = len(pairs)
    logps, tokens = impruver_scores(policy, _pair_inputs(pairs))
    loss, metrics = build_objective("orpo", {"lambda": 0.25}).loss(
        logps[:n], logps[n:], None, None, chosen_tokens=tokens[:n], rejected_tokens=tokens[n:])
    trainer = _trl(ORPOTrainer, beta=0.25)
    avg = logps / tokens
    losses, *_ = trainer.odds_ratio_loss(avg[:n], avg[n:])
    assert (loss - metrics["nll"]).item() == pytest.approx(-losses.mean().item(), abs=ATOL)


def test_kto_equals_trl(models: tuple[Any, Any]) -> None:
    from trl import KTOTrainer

    policy, ref = models
    g = torch.Generator().manual_seed(18)  # a batch whose KL estimate is positive (not clamped to 0)
    prompts = [_ids(g, n) for n in (2, 4, 1, 3, 5)]
    answers = [_ids(g, n) for n in (3, 6, 2, 5, 4)]
    labels = [True, False, True, True, False]
    # TRL's KL estimate pairs each prompt with the next sample's answer (mismatched pairs)
    kl_answers = answers[1:] + answers[:1]
    main, kl = padded(list(zip(prompts, answers))), padded(list(zip(prompts, kl_answers)))
    batch = {**main, "label": torch.tensor(labels), "KL_input_ids": kl["input_ids"],
             "KL_attention_mask": kl["attention_mask"], "KL_completion_mask": kl["completion_mask"]}
    trainer = _trl(KTOTrainer, model=policy, ref_model=ref, calculate_KL=True, precompute_ref_logps=False,
                   loss_type="kto", beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    with torch.no_grad():
        trl_loss = trainer._compute_loss(policy, batch, return_outputs=False)
    trl_metrics = trainer._metrics["eval"]

    logps, _ = impruver_scores(policy, list(zip(prompts, answers)))
    ref_logps, _ = impruver_scores(ref, list(zip(prompts, answers)))
    kl_logps, _ = impruver_scores(policy, list(zip(prompts, kl_answers)))
    ref_kl_logps, _ = impruver_scores(ref, list(zip(prompts, kl_answers)))
    good = torch.tensor(labels)
    loss, metrics = build_objective("kto", {"beta": 0.3, "undesirable_weight": 1.5}).loss(
        logps[good], logps[~good], ref_logps[good], ref_logps[~good],
        policy_kl_logps=kl_logps, ref_kl_logps=ref_kl_logps)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=ATOL)
    assert metrics["kl"].item() > 0.1  # the reference point z0 takes part
    assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"][-1], abs=ATOL)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert metrics[key].item() == pytest.approx(trl_metrics[key][-1], abs=ATOL), key
    assert metrics["rewards/margin"].item() == pytest.approx(trl_metrics["rewards/margins"][-1], abs=ATOL)
