"""Preference training (dpo, ipo, orpo, simpo, kto): the SFT recipe with its data, loss and evaluation seams
replaced; the loop, accumulation, clipping, schedule, checkpoints, resume, strategies and saving are SFT's.

Chosen by :func:`impruver.train.recipe.recipe_class` when the plan's objective says ``preference``.

* Data: the composed pair (or labelled) lines (:func:`impruver.data.preference.compose_pairs`); ``train.batch_size``
  counts pairs per device per micro-step. With ``train.packing`` both answers of every pair of a micro-batch share
  ``seq_len``-token rows, each scored as its own sequence (its own position_ids: no attention across sequences),
  with the output head on target positions only (:func:`impruver.objectives.model_sequence_logps`).
* Reference: the policy with its adapter disabled (adapter methods: no second copy), a frozen copy of the starting
  weights (full training), another model (``objective.reference_path``), or log-probs computed once before training
  and stored beside the composed data (``objective.reference: precomputed``).
* The loss of an optimizer step is the mean over its pairs (each micro-batch's objective mean, weighted by its
  pairs), so accumulation and the number of ranks change nothing but speed.
* Metrics: each logging step adds the objective's window means (rewards chosen / rejected, margin, accuracy,
  chosen / rejected log-probs) to metrics.jsonl, the progress line and trackers; validation gives the held-out
  preference loss (which picks the best checkpoint), accuracy and mean margin, at the start and at the end (in the
  run summary), and loss.png gets a panel of them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from impruver.errors import RunError
from impruver.files import atomic_write_text
from impruver.train.recipe import SFTRecipe

log = logging.getLogger("impruver")

REFERENCE_FILE = "reference_logps-{key}.json"  # beside the composed data: [chosen sum, rejected sum] per pair
HELDOUT = ("rewards/accuracy", "rewards/margin")  # the held-out figures the summary reports at start and end


class PreferenceRecipe(SFTRecipe):
    """Preference optimisation on composed pairs; see the module docstring."""

    def __init__(self, plan: Any, *, strategy: Any = None) -> None:
        from impruver.objectives import objective_of

        super().__init__(plan, strategy=strategy)
        self.objective = objective_of(plan)
        self.reference: Any = None
        self._window: dict[str, Any] = {}
        self._window_units = 0
        self.heldout_start: dict[str, float] | None = None
        self._last_heldout: tuple[int, dict[str, float]] = (-1, {})  # (step, held-out metrics) of the last evaluation

    # -- model and reference -------------------------------------------------------------------------------------

    def build_model(self, tokenizer: Any) -> Any:
        from impruver.train.kernels import use_fused_equivalents

        model = super().build_model(tokenizer)
        disable_model_dropout(model)
        use_fused_equivalents(model)  # e.g. GPT-2's Python GELU: a quarter of the step's activation memory
        options = self.objective.options
        if not self.objective.needs_reference or getattr(options, "reference", "model") == "precomputed":
            return model
        if getattr(options, "reference_path", None):
            self.reference = self._load_reference(tokenizer, options.reference_path)
        elif not self.method.adapter:
            # Full training: the starting weights, frozen (the adapter methods' reference is the model with its
            # adapter disabled: PreferenceLoss finds it, no copy).
            self.reference = copy.deepcopy(model).requires_grad_(False).eval()
        return model

    def _load_reference(self, tokenizer: Any, path: str) -> Any:
        from impruver import registry

        spec = self.plan.model.model_copy(update={"path": path, "weights": "pretrained"})
        load = self.method.load_options(self.plan)
        model = registry.lookup("models", spec.builder)(spec=spec, tokenizer=tokenizer, load=load, **spec.options)
        model.config.use_cache = False
        return model.requires_grad_(False).eval()

    def loss_module(self, model: Any) -> Any:
        from impruver.train.preference import PreferenceLoss

        return PreferenceLoss(self.objective, model, reference=self.reference)

    # -- data ----------------------------------------------------------------------------------------------------

    def setup_rows(self) -> None:
        """Pairs (or labelled answers) in a seeded order per epoch, ``batch_size`` per micro-batch, sliced per rank."""
        from impruver.data.preference import read_pairs
        from impruver.train.data import Batches
        from impruver.train.recipe import _pad_id

        spec, rank = self.spec, self.accelerator.process_index
        self.seq_len = self.plan.seq_len
        self.pad_id = _pad_id(self.tokenizer)
        self.train_samples = self._fitting(read_pairs(self.plan.train_path), "train")
        if not self.train_samples:
            raise RunError(f"{self.plan.train_path}: no preference pair fits {self.seq_len} tokens; check the dataset "
                           "and its length limit")
        val_path = Path(self.plan.val_path)
        self.val_samples = self._fitting(read_pairs(val_path), "val") if val_path.is_file() else []
        self.has_val = bool(self.val_samples)
        self._precompute_reference()
        one_each = [[i] for i in range(len(self.train_samples))]  # a "row" of the order is one pair
        self.batches = Batches(one_each, spec.batch_size, spec.seed, self.world, rank)
        self.val_batches = Batches([[i] for i in range(len(self.val_samples))], spec.batch_size, spec.seed,
                                   self.world, rank, shuffle=False) if self.has_val else None
        self.accum = spec.grad_accum
        self.total_steps = spec.max_steps or max(1, math.ceil(spec.epochs * self.batches.per_epoch / self.accum))
        log.info("%d train / %d val %s for objective %s, %d per micro-batch (%s), %d micro-batches per epoch; %d "
                 "optimizer steps on %d process(es)", len(self.train_samples), len(self.val_samples),
                 "pairs" if self.objective.pairs else "answers", self.objective.name, spec.batch_size,
                 "packed" if spec.packing else "padded", self.batches.per_epoch, self.total_steps, self.world)

    def _fitting(self, records: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
        """The records whose every sequence fits a row (compose limits to max_tokens; train.max_seq_len may be less)."""
        kept = [r for r in records if all(len(r[k]["input_ids"]) <= self.seq_len
                                          for k in ("chosen", "rejected", "completion") if k in r)]
        if len(kept) < len(records):
            log.warning("%s: %d of %d preference records are longer than %d tokens and are left out", split,
                        len(records) - len(kept), len(records), self.seq_len)
        return kept

    def _precompute_reference(self) -> None:
        """``objective.reference: precomputed``: the reference log-probs of every train and val pair, computed once
        with the starting weights and stored beside the composed data (reused while nothing they depend on changed),
        so the reference model is never held during training."""
        if getattr(self.objective.options, "reference", "model") != "precomputed" or not self.objective.needs_reference:
            return
        from impruver.data.pipeline import paths_of
        from impruver.train.preference import REF_LOGPS, precompute_reference

        data = paths_of(self.plan)
        report = json.loads(data["report"].read_text(encoding="utf-8"))
        key = hashlib.sha256(json.dumps([report.get("fingerprint"), self.plan.model.model_dump(mode="json"),
                                         self.plan.objective.options.get("reference_path"), self.seq_len],
                                        sort_keys=True).encode()).hexdigest()[:16]
        path = data["data"] / REFERENCE_FILE.format(key=key)
        if path.is_file():
            stored = json.loads(path.read_text(encoding="utf-8"))
        else:
            model = self.reference if self.reference is not None else self.model
            stored = {split: [p[REF_LOGPS] for p in precompute_reference(model, pairs, pad_id=self.pad_id,
                                                                           seq_len=self.seq_len)]
                      for split, pairs in (("train", self.train_samples), ("val", self.val_samples))}
            if self.main:
                atomic_write_text(path, json.dumps(stored))
            log.info("reference log-probs of %d pairs computed once and stored in %s", len(stored["train"]), path)
        for split, pairs in (("train", self.train_samples), ("val", self.val_samples)):
            for pair, ref in zip(pairs, stored[split], strict=True):
                pair[REF_LOGPS] = ref
        self.reference = None  # nothing to hold from here on

    def _collate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        from impruver.train.preference import collate_labelled, collate_pairs

        collate = collate_pairs if self.objective.pairs else collate_labelled
        batch = collate(records, pad_id=self.pad_id, seq_len=self.seq_len, packed=self.spec.packing)
        sides = [r[k] for r in records for k in ("chosen", "rejected", "completion") if k in r]
        batch["n_targets"] = len(records)  # the loss's units: the objective averages over pairs (answers: kto)
        batch["n_tokens"] = sum(len(s["input_ids"]) for s in sides)
        return batch

    def micro_batch(self, micro: int) -> dict[str, Any]:
        epoch, index = divmod(micro, self.batches.per_epoch)
        return self._collate([self.train_samples[row[0]] for row in self.batches.get(epoch, index)])

    # -- loss and metrics ----------------------------------------------------------------------------------------

    def step_loss(self, batch: dict[str, Any]) -> Any:
        """The objective's mean over the micro-batch's pairs times their number: the loop divides the step's sum by
        the step's pairs (all micro-batches, all ranks)."""
        if self.reference is not None:
            self.reference.to(self.accelerator.device)
        loss, metrics = self.forward_model(_on(batch, self.accelerator.device))
        n = batch["n_targets"]
        for key, value in metrics.items():
            self._window[key] = self._window.get(key, 0) + value.detach().float() * n
        self._window_units += n
        return loss * n

    def train_metrics(self) -> dict[str, float]:
        """The window's means of the objective's metrics (over every rank), then a fresh window."""
        import torch

        keys = sorted(k for k in self._window if k != "loss")
        if not keys:
            return {}
        acc = self.accelerator
        sums = acc.reduce(torch.stack([self._window[k] for k in keys] +
                                      [torch.tensor(float(self._window_units), device=acc.device)]), "sum")
        self._window, self._window_units = {}, 0
        return {k: float(v / sums[-1].clamp(min=1)) for k, v in zip(keys, sums[:-1])}

    def preference_eval(self) -> dict[str, float]:
        """Held-out loss and metrics, pair-weighted over the whole validation set (all ranks)."""
        import torch

        model, acc = self.forward_model, self.accelerator
        model.eval()
        sums: dict[str, Any] = {}
        with torch.no_grad():
            for index in range(self.val_batches.per_epoch):
                rows = self.val_batches.get(0, index)
                if not rows:
                    continue
                if self.reference is not None:
                    self.reference.to(acc.device)
                batch = self._collate([self.val_samples[row[0]] for row in rows])
                _, metrics = model(_on(batch, acc.device))
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0) + value.float() * batch["n_targets"]
                sums["_n"] = sums.get("_n", 0) + batch["n_targets"]
        model.train()
        keys = sorted(k for k in sums if k != "_n")
        totals = acc.reduce(torch.stack([torch.as_tensor(sums[k], device=acc.device) for k in [*keys, "_n"]]), "sum")
        return {k: float(v / totals[-1].clamp(min=1)) for k, v in zip(keys, totals[:-1])}

    def evaluate(self) -> float | None:
        """The held-out preference loss (it picks the best checkpoint); the other held-out metrics are written."""
        if not self.has_val:
            return None
        result = self.preference_eval()
        self.writer.write({"event": "eval_preference", "step": self.state.step,
                           **{f"eval_{k}": v for k, v in result.items()}})
        self._last_heldout = (self.state.step, result)
        return result["loss"]

    def train(self) -> None:
        if self.has_val:
            self.heldout_start = self._heldout_at_start()
        super().train()

    def _heldout_at_start(self) -> dict[str, float]:
        """The held-out metrics of the starting weights: measured at step 0, read back from metrics.jsonl on a
        resume."""
        from impruver.train.metrics import read_metrics

        if self.state.step > 0:
            for record in read_metrics(self.layout.metrics):
                if record.get("event") == "eval_preference" and record.get("step") == 0:
                    return {k.removeprefix("eval_"): v for k, v in record.items() if k.startswith("eval_")}
        result = self.preference_eval()
        self.writer.write({"event": "eval_preference", "step": 0, **{f"eval_{k}": v for k, v in result.items()}})
        log.info("held-out at the start: %s", _figures(result))
        return result

    def summary_metrics(self) -> dict[str, Any]:
        """Held-out preference accuracy and mean margin at the start and at the end (the weights kept)."""
        if not self.has_val:
            return {"objective": self.objective.name}
        step, end = self._last_heldout
        state = self.state
        if step != state.step or (self.spec.load_best_at_end and state.best_eval_loss is not None
                                  and state.best_eval_loss < end["loss"]):
            end = self.preference_eval()  # the weights kept are not the ones last evaluated
        start = self.heldout_start or {}
        log.info("held-out preference %s -> %s", _figures(start), _figures(end))
        out: dict[str, Any] = {"objective": self.objective.name}
        for key in HELDOUT:
            name = key.split("/")[-1]
            out[f"heldout_{name}_start"] = start.get(key)
            out[f"heldout_{name}_end"] = end.get(key)
        return out

    def finish(self) -> dict[str, Any]:
        summary = super().finish()
        if self.main:
            plot_preference(self.plan.output_dir)
        return summary


def disable_model_dropout(model: Any) -> int:
    """Switch off the model's own dropout (residual, embedding, attention; an adapter's dropout, which the user set
    in the method's options, is kept); returns how many modules were changed.

    Why: the reference log-probs of an adapter method come from the same modules in training mode with the adapter
    disabled, and the objective compares policy and reference log-probs of the same tokens; dropout would give both
    sides different random masks, so the log-ratios start away from 0 and carry noise larger than the signal. TRL
    (``disable_dropout=True``) does the same. It also saves the dropout masks' memory and, on the CPU, lets SDPA
    keep its fused kernel (attention dropout forces the O(width^2) math path, which holds the attention weights)."""
    import torch

    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no adapter layers
        BaseTunerLayer = ()  # type: ignore[assignment,misc]  # noqa: N806
    adapter_parts: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name, child in module.named_children():
                if name != "base_layer":
                    adapter_parts.update(id(m) for m in child.modules())
    changed = 0
    for module in model.modules():
        if id(module) in adapter_parts:
            continue
        if isinstance(module, torch.nn.Dropout) and module.p:
            module.p, changed = 0.0, changed + 1
        if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout:
            module.attention_dropout, changed = 0.0, changed + 1  # Llama-style attention: a rate, not a module
    return changed


def _figures(metrics: dict[str, float]) -> str:
    if not metrics:
        return "(not measured)"
    return (f"accuracy {metrics.get('rewards/accuracy', float('nan')):.3f}, margin "
            f"{metrics.get('rewards/margin', float('nan')):.4f}, loss {metrics.get('loss', float('nan')):.4f}")


def _on(batch: Any, device: Any) -> Any:
    """The batch's tensors on ``device`` (nested collations too: KTO's main and KL parts)."""
    if isinstance(batch, dict):
        return {k: _on(v, device) for k, v in batch.items()}
    return batch.to(device) if hasattr(batch, "to") else batch


def plot_preference(output_dir: str | Path) -> Path | None:
    """loss.png with a second panel: train and held-out reward margin and accuracy by step (None without
    matplotlib)."""
    import importlib.util
    import os

    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from impruver.layout import RunLayout
    from impruver.train.metrics import read_metrics

    layout = RunLayout.of(output_dir)
    records = read_metrics(layout.metrics)
    train = [r for r in records if r.get("event") == "train"]
    held = [r for r in records if r.get("event") == "eval_preference"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), dpi=100, sharex=True)
    top.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if held:
        top.plot([r["step"] for r in held], [r["eval_loss"] for r in held], "o-", label="held-out loss")
    top.set_ylabel("preference loss")
    for key, label in (("rewards/margin", "margin"), ("rewards/accuracy", "accuracy")):
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            bottom.plot(*zip(*points), label=f"train {label}")
        points = [(r["step"], r[f"eval_{key}"]) for r in held if f"eval_{key}" in r]
        if points:
            bottom.plot(*zip(*points), "o-", label=f"held-out {label}")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("reward margin / accuracy")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend()
    target = layout.loss_plot
    tmp = target.with_name(".loss.tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, target)
    return target


__all__ = ["PreferenceRecipe", "disable_model_dropout", "plot_preference"]
