"""Training objectives (registry ``objectives``): what the loss is, what it needs and what it costs.

An objective is a component that answers for itself, so the recipe, the planner and the memory estimate ask it
instead of matching names::

    objective = build_objective("dpo", {"beta": 0.1})      # options validated by the objective's own schema
    objective.needs_reference     # does the loss read a reference model's log-probs?   (orpo, simpo: no)
    objective.pairs               # one chosen and one rejected answer per sample?      (kto: unpaired, labelled)
    objective.preference          # preference data at all?                             (sft: no)
    objective.accepts             # the records it trains on, as formats produce them ("pair", "labelled", ...)
    objective.memory(n_params=..., adapter=..., compute_bytes=...) -> ObjectiveMemory
    objective.check(adapter=...) -> list[Problem]             # rules that need more than its own options
    objective.loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   chosen_tokens=..., rejected_tokens=...) -> (loss, metrics)

The log-probabilities handed to ``loss`` are always per-sequence *sums* over the answer tokens, with the
answers' token counts beside them; objectives that use length-averaged log-probs (ipo's normalisation, orpo,
simpo) divide themselves, so one scoring pass (:func:`sequence_logps`) serves every objective. Scoring works on
packed rows: several sequences per row, told apart by ``sequence_ids`` (or by ``position_ids`` resets), each
scored as if alone (transformers masks across packed samples given their position_ids, see
:mod:`impruver.train.data`), with the output head applied to target positions only where the family allows.

Conventions follow TRL (the reference implementation the tests compare with): rewards are ``beta`` times the
policy/reference log-ratio (dpo, ipo, kto) or ``beta`` times the average log-prob (orpo, simpo); the margin is
chosen minus rejected reward; the accuracy is the share of pairs whose chosen reward is the larger.

This module imports no torch at import time (planning stays torch-free); the loss code imports it when called.
"""

from __future__ import annotations

import importlib.metadata as md
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, Protocol

import catalogue
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from impruver.errors import ConfigError, Problem, RegistryError, choices_hint
from impruver.record import IGNORE_INDEX
from impruver.registry import objectives

if TYPE_CHECKING:
    from torch import Tensor


Metrics = dict[str, "Tensor"]


# ----------------------------------------------------------------------------------------------------------------
# Options: each objective's config section, validated by its own schema (extra keys are typos, not ignored).
# ----------------------------------------------------------------------------------------------------------------

class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ReferenceOptions(_Options):
    """What every objective with a reference model shares."""

    reference: Literal["model", "precomputed"] = "model"
    """``model``: reference log-probs computed alongside training (adapter methods: the same model with the
    adapter disabled, no second copy; full training: a frozen copy of the starting weights). ``precomputed``:
    computed once before training and stored beside the composed data, so no reference is held while training."""
    reference_path: str | None = None
    """A different reference model (Hub id or folder); None: the model training starts from."""


class SftOptions(_Options):
    """Supervised fine-tuning: no options."""


class DpoOptions(ReferenceOptions):
    beta: float = Field(0.1, gt=0)
    """Inverse strength of the pull towards the reference (higher: stay closer)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Conservative DPO (cDPO): the probability that a pair's preference label is flipped."""


class IpoOptions(ReferenceOptions):
    beta: float = Field(0.1, gt=0)
    """IPO's regularisation tau: the target per-token log-ratio margin is 1 / (2 beta)."""


class OrpoOptions(_Options):
    lambda_: float = Field(0.1, gt=0, alias="lambda")
    """Weight of the odds-ratio term next to the chosen answers' NLL (written ``lambda`` in configs)."""


class SimpoOptions(_Options):
    beta: float = Field(2.0, gt=0)
    """Scale of the length-averaged log-prob reward (the SimPO paper uses 2.0-2.5)."""
    gamma: float = Field(1.0, ge=0)
    """Target reward margin between chosen and rejected (SimPO's gamma; gamma / beta about 0.5 works well)."""


class KtoOptions(ReferenceOptions):
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)
    """Weight of desirable answers' losses; KTO suggests weights with desirable_weight * n_desirable /
    (undesirable_weight * n_undesirable) in [1, 4/3] when the two kinds are unbalanced."""
    undesirable_weight: float = Field(1.0, gt=0)


# ----------------------------------------------------------------------------------------------------------------
# Traits and memory
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ObjectiveMemory:
    """What an objective adds to the memory of a training step, per device."""

    reference_bytes: float
    """Weights of a reference model held during training (0: none, the adapter-disabled model, or precomputed)."""
    sequences_per_sample: int
    """Sequences run forward and backward per sample: activations and logits scale with it (pairs: 2)."""


class Objective(Protocol):
    """The protocol every registered objective follows."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]]
    needs_reference: ClassVar[bool]
    pairs: ClassVar[bool]
    preference: ClassVar[bool]
    accepts: ClassVar[frozenset[str]]  # records it trains on: "conversation", "pair", "labelled"
    options: BaseModel

    def memory(self, *, n_params: int, adapter: bool, compute_bytes: float) -> ObjectiveMemory: ...

    def check(self, *, adapter: bool, key: str = "objective") -> list[Problem]: ...

    def loss(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor | None,
             ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None, *,
             chosen_tokens: Tensor, rejected_tokens: Tensor | None, **extra: Any) -> tuple[Tensor, Metrics]: ...


def _check_reference(objective: Any, *, adapter: bool, key: str) -> list[Problem]:
    """Reference settings that cannot work: precomputed reference log-probs for KTO (its reference point pairs
    each prompt with another sample's answer, which depends on the batch). ``adapter`` is part of the protocol
    (a plugin's rule may depend on the method); no built-in rule needs it yet."""
    options = objective.options
    if not isinstance(options, ReferenceOptions):
        return []
    if not objective.pairs and options.reference == "precomputed":
        return [Problem(f"{key}.reference", f"'{objective.name}' computes its reference log-probs during training "
                                            "(its KL pairs depend on the batch); use reference: model")]
    return []


def _reference_bytes(options: ReferenceOptions, *, n_params: int, adapter: bool, compute_bytes: float) -> float:
    """The reference model's weights in memory: none when precomputed, none for an adapter method whose
    reference is the same model with its adapter disabled, else one more copy in the compute dtype."""
    if options.reference == "precomputed":
        return 0.0
    if adapter and options.reference_path is None:
        return 0.0
    return float(n_params) * compute_bytes


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces of the math (inputs: per-sequence summed log-probs [n] and token counts [n])
# ----------------------------------------------------------------------------------------------------------------

def _average(logps: Tensor, tokens: Tensor) -> Tensor:
    """Length-averaged log-probs: sum / answer tokens (at least one, so an empty answer cannot divide by 0)."""
    return logps / tokens.clamp(min=1).to(logps.dtype)


def _pair_metrics(loss: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor,
                  rejected_logps: Tensor) -> Metrics:
    """The metrics every pairwise objective logs, as detached 0-d tensors (no device sync in the loop)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def _smoothed_sigmoid(logits: Tensor, smoothing: float) -> Tensor:
    """-(1 - e) log sigmoid(x) - e log sigmoid(-x): the logistic loss when the label is flipped with prob. e."""
    import torch.nn.functional as F

    return -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    import torch

    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _require(value: Tensor | None, what: str, objective: str) -> Tensor:
    if value is None:
        raise ValueError(f"objective '{objective}' needs {what}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# The objectives
# ----------------------------------------------------------------------------------------------------------------

class _Builtin:
    """What the built-in objectives share: the traits of a pairwise preference objective with a reference model
    (each overrides what differs), the reference check, and the memory rule."""

    options: Any
    name: ClassVar[str]
    needs_reference: ClassVar[bool] = True
    pairs: ClassVar[bool] = True
    preference: ClassVar[bool] = True
    accepts: ClassVar[frozenset[str]] = frozenset({"pair"})
    sequences_per_sample: ClassVar[int] = 2  # sequences per sample whose activations are kept for backward

    def check(self, *, adapter: bool, key: str = "objective") -> list[Problem]:
        return _check_reference(self, adapter=adapter, key=key)

    def memory(self, *, n_params: int, adapter: bool, compute_bytes: float) -> ObjectiveMemory:
        ref = 0.0
        if self.needs_reference and isinstance(self.options, ReferenceOptions):
            ref = _reference_bytes(self.options, n_params=n_params, adapter=adapter, compute_bytes=compute_bytes)
        return ObjectiveMemory(reference_bytes=ref, sequences_per_sample=self.sequences_per_sample)


@objectives.register("sft")
@dataclass(frozen=True)
class Sft(_Builtin):
    """Supervised fine-tuning: the mean negative log-likelihood of the answer tokens (token-weighted).

    impruver's SFT recipe computes this with ``TokenLoss`` on packed rows; ``loss`` here gives the same value from
    scored sequences, for a recipe that mixes objectives or evaluates an SFT model on preference data.
    """

    options: SftOptions = SftOptions()
    name: ClassVar[str] = "sft"
    Options: ClassVar[type[BaseModel]] = SftOptions
    needs_reference: ClassVar[bool] = False
    pairs: ClassVar[bool] = False
    preference: ClassVar[bool] = False
    accepts: ClassVar[frozenset[str]] = frozenset({"conversation"})
    sequences_per_sample: ClassVar[int] = 1

    def loss(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor | None = None,
             ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None, *,
             chosen_tokens: Tensor, rejected_tokens: Tensor | None = None, **extra: Any) -> tuple[Tensor, Metrics]:
        loss = -policy_chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)
        return loss, {"loss": loss.detach(), "logps/chosen": policy_chosen_logps.detach().mean()}


@objectives.register("dpo")
@dataclass(frozen=True)
class Dpo(_Builtin):
    """Direct Preference Optimization (Rafailov et al. 2023), sigmoid loss, with conservative label smoothing
    (cDPO): ``-(1-e) log sig(beta d) - e log sig(-beta d)``, ``d`` = chosen minus rejected policy/reference
    log-ratio of the summed answer log-probs. Mean over pairs."""

    options: DpoOptions = DpoOptions()
    name: ClassVar[str] = "dpo"
    Options: ClassVar[type[BaseModel]] = DpoOptions

    def loss(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor | None,
             ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None, *,
             chosen_tokens: Tensor | None = None, rejected_tokens: Tensor | None = None,
             **extra: Any) -> tuple[Tensor, Metrics]:
        rejected = _require(policy_rejected_logps, "rejected log-probs", self.name)
        chosen_ratio = policy_chosen_logps - _require(ref_chosen_logps, "reference log-probs", self.name)
        rejected_ratio = rejected - _require(ref_rejected_logps, "reference log-probs", self.name)
        beta = self.options.beta
        loss = _smoothed_sigmoid(beta * (chosen_ratio - rejected_ratio), self.options.label_smoothing).mean()
        return loss, _pair_metrics(loss, beta * chosen_ratio, beta * rejected_ratio, policy_chosen_logps, rejected)


@objectives.register("ipo")
@dataclass(frozen=True)
class Ipo(_Builtin):
    """Identity Preference Optimization (Azar et al. 2023, eq. 17): ``(h - 1/(2 beta))^2`` with ``h`` the
    difference of the chosen and rejected log-ratios, each averaged over its answer's tokens (as TRL does, with
    the IPO authors' agreement, so beta means the same at any answer length). Rewards use the summed ratios."""

    options: IpoOptions = IpoOptions()
    name: ClassVar[str] = "ipo"
    Options: ClassVar[type[BaseModel]] = IpoOptions

    def loss(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor | None,
             ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None, *,
             chosen_tokens: Tensor, rejected_tokens: Tensor, **extra: Any) -> tuple[Tensor, Metrics]:
        rejected = _require(policy_rejected_logps, "rejected log-probs", self.name)
        chosen_ratio = policy_chosen_logps - _require(ref_chosen_logps, "reference log-probs", self.name)
        rejected_ratio = rejected - _require(ref_rejected_logps, "reference log-probs", self.name)
        beta = self.options.beta
        h = _average(chosen_ratio, chosen_tokens) - _average(rejected_ratio, rejected_tokens)
        loss = ((h - 1 / (2 * beta)) ** 2).mean()
        return loss, _pair_metrics(loss, beta * chosen_ratio, beta * rejected_ratio, policy_chosen_logps, rejected)


@objectives.register("orpo")
@dataclass(frozen=True)
class Orpo(_Builtin):
    """Odds Ratio Preference Optimization (Hong et al. 2024), no reference model: the chosen answers' NLL (mean
    over their tokens) minus ``lambda`` times the mean log-sigmoid of the log odds ratio of the length-averaged
    log-probs. The NLL covers the answer tokens only (the trained span; the prompt is never trained)."""

    options: OrpoOptions = OrpoOptions()
    name: ClassVar[str] = "orpo"
    Options: ClassVar[type[BaseModel]] = OrpoOptions
    needs_reference: ClassVar[bool] = False

    def loss(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor | None,
             ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None, *,
             chosen_tokens: Tensor, rejected_tokens: Tensor, **extra: Any) -> tuple[Tensor, Metrics]:
        import torch.nn.functional as F

        rejected = _require(policy_rejected_logps, "rejected log-probs", self.name)
        chosen_avg = _average(policy_chosen_logps, chosen_tokens).float()  # [pairs], < 0
        rejected_avg = _average(rejected, rejected_tokens).float()
        # log odds(y) = log p - log(1 - p), with p the per-token-averaged likelihood (paper eq. 4 and 7)
        log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
        nll = -policy_chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)
        lam = self.options.lambda_
        loss = nll - lam * F.logsigmoid(log_odds).mean()
        metrics = _pair_metrics(loss, lam * chosen_avg, lam * rejected_avg, chosen_avg, rejected_avg)
        metrics.update({"nll": nll.detach(), "log_odds": log_odds.detach().mean()})
        return loss, metrics


@objectives.register("simpo")
@dataclass(frozen=True)
class Simpo(_Builtin):
    """Simple Preference Optimization (Meng et al. 2024), no reference model:
    ``-log sig(beta (avg_chosen - avg_rejected) - gamma)`` with length-averaged log-probs."""

    options: SimpoOptions = SimpoOptions()
    name: ClassVar[str] = "simpo"
    Options: ClassVar[type[BaseModel]] = SimpoOptions
    needs_reference: ClassVar[bool] = False

    def loss(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor | None,
             ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None, *,
             chosen_tokens: Tensor, rejected_tokens: Tensor, **extra: Any) -> tuple[Tensor, Metrics]:
        import torch.nn.functional as F

        rejected = _require(policy_rejected_logps, "rejected log-probs", self.name)
        chosen_avg = _average(policy_chosen_logps, chosen_tokens)
        rejected_avg = _average(rejected, rejected_tokens)
        beta = self.options.beta
        loss = -F.logsigmoid(beta * (chosen_avg - rejected_avg) - self.options.gamma).mean()
        return loss, _pair_metrics(loss, beta * chosen_avg, beta * rejected_avg, chosen_avg, rejected_avg)


@objectives.register("kto")
@dataclass(frozen=True)
class Kto(_Builtin):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, eq. 7) on unpaired, labelled answers.

    "chosen" are the desirable answers of the batch [n], "rejected" the undesirable ones [m] (n, m may differ,
    either may be 0). The reference point z0 is the batch's KL estimate: the mean policy/reference log-ratio of
    mismatched (prompt, answer) pairs (``policy_kl_logps`` / ``ref_kl_logps``, summed log-probs [k], computed
    without gradient), clamped at 0; without them z0 = 0. Loss: the mean over all answers of
    ``desirable_weight (1 - sig(beta (r - z0)))`` and ``undesirable_weight (1 - sig(beta (z0 - r)))``.
    """

    options: KtoOptions = KtoOptions()
    name: ClassVar[str] = "kto"
    Options: ClassVar[type[BaseModel]] = KtoOptions
    pairs: ClassVar[bool] = False
    accepts: ClassVar[frozenset[str]] = frozenset({"labelled", "pair"})

    # one answer per sample is trained; the KL answers run without gradient (no activations kept)
    sequences_per_sample: ClassVar[int] = 1

    def loss(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor | None,
             ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None, *,
             chosen_tokens: Tensor | None = None, rejected_tokens: Tensor | None = None,
             policy_kl_logps: Tensor | None = None, ref_kl_logps: Tensor | None = None,
             **extra: Any) -> tuple[Tensor, Metrics]:
        import torch

        o = self.options
        rejected = _require(policy_rejected_logps, "undesirable log-probs (may be empty)", self.name)
        chosen_ratio = policy_chosen_logps - _require(ref_chosen_logps, "reference log-probs", self.name)
        rejected_ratio = rejected - _require(ref_rejected_logps, "reference log-probs", self.name)
        kl = torch.zeros((), dtype=chosen_ratio.dtype, device=chosen_ratio.device)
        if policy_kl_logps is not None and ref_kl_logps is not None and policy_kl_logps.numel():
            kl = (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
        losses = torch.cat([o.desirable_weight * (1 - torch.sigmoid(o.beta * (chosen_ratio - kl))),
                            o.undesirable_weight * (1 - torch.sigmoid(o.beta * (kl - rejected_ratio)))])
        loss = losses.mean()
        metrics: Metrics = {"loss": loss.detach(), "kl": kl}
        if chosen_ratio.numel():
            metrics["rewards/chosen"] = o.beta * chosen_ratio.detach().mean()
            metrics["logps/chosen"] = policy_chosen_logps.detach().mean()
        if rejected_ratio.numel():
            metrics["rewards/rejected"] = o.beta * rejected_ratio.detach().mean()
            metrics["logps/rejected"] = rejected.detach().mean()
        if chosen_ratio.numel() and rejected_ratio.numel():
            metrics["rewards/margin"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# Building and checking (planning: no torch)
# ----------------------------------------------------------------------------------------------------------------

def objective_names() -> list[str]:
    """Every registered objective name (built-ins and ``impruver_objectives`` entry points)."""
    found = {key[-1] for key in catalogue._get_all(objectives.namespace)}  # type: ignore[attr-defined]
    found.update(ep.name for ep in md.entry_points(group="impruver_objectives"))
    return sorted(found)


def objective_class(name: str) -> type:
    """The registered objective class; a RegistryError lists the valid names."""
    try:
        return objectives.get(name)
    except catalogue.RegistryError:
        raise RegistryError(f"no objective named '{name}': {choices_hint(name, objective_names())}") from None


def check_objective(name: str, options: dict[str, Any] | None = None, key: str = "objective", *,
                    adapter: bool = False) -> list[Problem]:
    """Every problem with an objective section (unknown name, unknown or invalid options, the objective's own
    checks given whether the method trains an adapter), without building anything heavy."""
    try:
        cls = objective_class(name)
    except RegistryError as exc:
        return [Problem(key, str(exc))]
    try:
        validated = cls.Options.model_validate(dict(options or {}))
    except ValidationError as exc:
        return [_problem(err, cls, key) for err in exc.errors()]
    return cls(options=validated).check(adapter=adapter, key=key)


def data_problems(name: str, produces: dict[str, str], key: str = "dataset.sources") -> list[Problem]:
    """A cross-section rule for the planner: every source's format must produce records the objective trains
    on (``produces``: source name -> ``impruver.data.preference.produces_of(format)``). KTO also takes pairs
    (each pair becomes a desirable and an undesirable answer)."""
    accepts = objective_class(name).accepts
    return [Problem(f"{key}.{source}.format", f"objective '{name}' trains on {' or '.join(sorted(accepts))} "
                                              f"records, but this source's format gives {kind} records")
            for source, kind in produces.items() if kind not in accepts]


def build_objective(name: str, options: dict[str, Any] | None = None) -> Any:
    """The objective ``name`` with its validated options.

    Raises:
        ConfigError: every problem with the name or the options at once.
    """
    problems = check_objective(name, options)
    if problems:
        raise ConfigError(problems)
    cls = objective_class(name)
    return cls(options=cls.Options.model_validate(dict(options or {})))


def objective_of(plan: Any) -> Any:
    """The objective of a validated plan (``plan.objective``: its name and options), built."""
    return build_objective(plan.objective.name, plan.objective.options)


def _problem(err: Any, cls: type, key: str) -> Problem:
    where = ".".join([key, *map(str, err["loc"])])
    if err["type"] == "extra_forbidden":
        fields = [f.alias or n for n, f in cls.Options.model_fields.items()]
        return Problem(where, f"'{cls.name}' has no option '{err['loc'][-1]}': "
                              f"{choices_hint(str(err['loc'][-1]), fields)}")
    return Problem(where, str(err["msg"]))


# ----------------------------------------------------------------------------------------------------------------
# Sequence log-probabilities on packed rows
# ----------------------------------------------------------------------------------------------------------------

class SequenceLogps(NamedTuple):
    """Per-sequence scores: ``sums[i]`` summed log-prob of sequence i's target tokens, ``tokens[i]`` their count."""

    sums: Tensor  # [n_sequences] float32
    tokens: Tensor  # [n_sequences] int64

    @property
    def means(self) -> Tensor:
        """Length-averaged log-probs (simpo, orpo)."""
        return _average(self.sums, self.tokens)


def sequence_ids_from_positions(position_ids: Tensor) -> Tensor:
    """Sequence index of every position of packed rows [rows, length]: a new sequence starts wherever
    position_ids is 0, numbered row by row, left to right (a padding tail that restarts at 0 is a sequence too:
    it has no targets, so it scores 0 over 0 tokens)."""
    starts = position_ids.reshape(-1) == 0
    return (starts.cumsum(0) - 1).reshape(position_ids.shape)


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """Log-prob of each target under ``logits`` [N, vocab] -> [N] float32 (targets [N], no IGNORE_INDEX)."""
    import torch.nn.functional as F

    return -F.cross_entropy(logits.float(), targets, reduction="none")


def sequence_logps(logits: Tensor, targets: Tensor, sequence_ids: Tensor, n_sequences: int) -> SequenceLogps:
    """Per-sequence summed log-probs from full logits.

    Args:
        logits: [rows, length, vocab].
        targets: [rows, length], already shifted (``targets[t]`` is the token after t), IGNORE_INDEX where no
            target (prompt, padding, each sequence's last token).
        sequence_ids: [rows, length], the sequence each position belongs to (0..n_sequences-1).
        n_sequences: number of sequences in the batch.
    """
    keep = targets.reshape(-1) != IGNORE_INDEX
    flat = logits.reshape(-1, logits.shape[-1])[keep]  # [targets, vocab]
    return _gather(token_logps(flat, targets.reshape(-1)[keep]), sequence_ids.reshape(-1)[keep], n_sequences)


def model_sequence_logps(model: Any, input_ids: Tensor, position_ids: Tensor, targets: Tensor,
                         sequence_ids: Tensor, n_sequences: int,
                         attention_mask: Tensor | None = None) -> SequenceLogps:
    """Per-sequence summed log-probs of a causal LM on packed rows [rows, length].

    The head runs on target positions only when the family allows it (``impruver.train.loss.targets_only``):
    no [tokens x vocabulary] logits for prompts, and those of the targets are taken chunk by chunk, never all
    kept for the backward pass (:func:`impruver.train.head_logps.head_token_logps`); otherwise the model's own
    forward and full logits.
    """
    from impruver.train.head_logps import head_token_logps
    from impruver.train.loss import targets_only

    inputs: dict[str, Any] = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    if not targets_only(model):
        out = model(**inputs)
        return sequence_logps(out.logits, targets, sequence_ids, n_sequences)
    hidden = model.get_decoder()(**inputs).last_hidden_state  # [rows, length, hidden]
    keep = targets.reshape(-1) != IGNORE_INDEX
    per_token = head_token_logps(model.get_output_embeddings(), hidden.reshape(-1, hidden.shape[-1])[keep],
                                 targets.reshape(-1)[keep])  # [targets]
    return _gather(per_token, sequence_ids.reshape(-1)[keep], n_sequences)


def _gather(per_token: Tensor, index: Tensor, n_sequences: int) -> SequenceLogps:
    import torch

    sums = torch.zeros(n_sequences, dtype=per_token.dtype, device=per_token.device).index_add(0, index, per_token)
    tokens = torch.zeros(n_sequences, dtype=torch.long, device=per_token.device)
    tokens = tokens.index_add(0, index, torch.ones_like(index, dtype=torch.long))
    return SequenceLogps(sums, tokens)


__all__ = [
    "Dpo", "Ipo", "Kto", "Metrics", "Objective", "ObjectiveMemory", "Orpo", "SequenceLogps", "Sft", "Simpo",
    "build_objective", "check_objective", "data_problems", "model_sequence_logps", "objective_class",
    "objective_names", "objective_of", "objectives", "sequence_ids_from_positions", "sequence_logps", "token_logps",
]
