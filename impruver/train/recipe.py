"""The training recipe: ``impruver train`` and the main job (``impruver`` with overrides).

:class:`SFTRecipe` is a small class with seams, read top to bottom::

    recipe = SFTRecipe(plan)
    recipe.setup()      # checks -> accelerator -> seed, tokenizer, model, method -> rows -> optimizer -> resume
    recipe.train()      # the loop: accumulate, clip, step; log, evaluate() and save_checkpoint() by step count
    recipe.finish()     # final evaluation, the best checkpoint's weights, save, card; returns the summary

Later objectives and tests replace a part (``build_model``, ``loss_module``, ``step_loss``, ``evaluate``,
``save_checkpoint``, ...) in a subclass instead of patching module functions. The recipe composes no data and
writes no plan: :mod:`impruver.jobs` does that before it runs (on the main process, before any worker starts).

The loop runs on ``accelerate.Accelerator`` built by the plan's distribution strategy (:mod:`impruver.strategies`):
one process here, DDP / FSDP / DeepSpeed when ``impruver.launch`` starts several workers on the frozen plan. The
strategy also decides how the state is checkpointed and how the full weights are gathered at the end. Only the
main process writes files other than checkpoint shards. The loss of an optimizer step is token-weighted over every
micro-batch of every rank: sum of per-token cross-entropy / number of target tokens, so gradient accumulation and
packing change nothing but speed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from impruver.errors import RunError
from impruver.files import atomic_write_text
from impruver.layout import RunLayout
from impruver.plan import environment_problems

if TYPE_CHECKING:
    from impruver.plan import Plan
    from impruver.train.data import Batches, Samples

log = logging.getLogger("impruver")


def run(plan: Plan, *, worker: bool = False, **_flags: Any) -> dict[str, Any]:
    """Train what ``plan`` describes and leave the model, tokenizer, metrics and card in its output_dir.

    The data must be composed and the plan frozen already (:func:`impruver.jobs.train_job` does both).

    Args:
        plan: the validated plan.
        worker: this process is one rank of a launched group (kept for callers; the recipe reads the
            process group from accelerate either way).
        **_flags: stage flags already handled by the job graph (``force``).

    Returns:
        A summary: output_dir, steps, train_loss, eval_loss, best_step, tokens, world_size, elapsed_s.

    Raises:
        RunError: the machine cannot run the plan, or the memory plan says it will not fit.
    """
    recipe = recipe_class(plan)(plan)
    recipe.setup()
    recipe.train()
    return recipe.finish()


def recipe_class(plan: Plan) -> type[SFTRecipe]:
    """The recipe the plan's objective trains with, asked of the objective: SFT, or pairs for a preference one."""
    from impruver.objectives import objective_of

    if objective_of(plan).preference:
        from impruver.train.pref_recipe import PreferenceRecipe

        return PreferenceRecipe
    return SFTRecipe


class SFTRecipe:
    """Supervised fine-tuning (and training from scratch) of a causal LM on composed token rows.

    Attributes after :meth:`setup` (for subclasses): ``accelerator``, ``strategy``, ``method``, ``tokenizer``,
    ``model`` (the module trained, unwrapped), ``loss_model`` (prepared), ``optimizer``, ``scheduler``,
    ``state`` (:class:`~impruver.train.checkpoint.TrainState`), ``batches`` / ``val_batches``, ``writer``.
    """

    def __init__(self, plan: Plan, *, strategy: Any = None) -> None:
        from impruver.components import method_of
        from impruver.strategies import strategy_of

        self.plan = plan
        self.spec = plan.train
        self.layout = RunLayout.of(plan.output_dir)
        self.strategy = strategy if strategy is not None else strategy_of(plan)
        self.method = method_of(plan)

    # -- setup ---------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything the loop needs, checked before anything heavy loads."""
        self.check()
        from accelerate.utils import set_seed

        from impruver.data import pipeline

        self.accelerator = self.build_accelerator()
        self.main, self.world = self.accelerator.is_main_process, self.accelerator.num_processes
        set_seed(self.spec.seed)
        self.tokenizer = pipeline.load_composed_tokenizer(self.plan)
        self.model = self.build_model(self.tokenizer)
        self.setup_rows()
        self.setup_optimizer()
        self.resume()
        self.setup_metrics()

    def check(self) -> None:
        """Checks that need nothing loaded: missing packages, no GPU, a memory estimate over the budget."""
        problems = [str(p) for p in environment_problems(self.plan)]
        memory = memory_problem(self.plan)
        if memory:
            problems.append(memory)
        if problems:
            raise RunError("this machine cannot run the plan:\n" + "\n".join(f"  - {p}" for p in problems))
        from impruver.train.metrics import check_reporters

        check_reporters(list(self.spec.report_to))

    def build_accelerator(self) -> Any:
        """The strategy's Accelerator, on a clean accelerate state unless this process is one of a launched group."""
        from impruver.launch import under_launcher

        if not under_launcher():
            # accelerate keeps one global state per process: a second run in the same process (a notebook, a
            # sweep, the tests) with other precision or plugin settings must start from a clean one.
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        from impruver.train.metrics import accelerator_options

        # The trackers of train.report_to (none: the strategy's Accelerator as it is, a plugin's included).
        trackers = accelerator_options(self.plan.output_dir, self.spec.report_to)
        return self.strategy.accelerator(self.plan, **trackers)

    def build_model(self, tokenizer: Any) -> Any:
        """The module to train: the base from the model builder, then the method's wrapping (adapters, ...)."""
        from impruver import registry
        from impruver.train.outputs import base_needs_saving, save_base

        plan = self.plan
        model = registry.lookup("models", plan.model.builder)(spec=plan.model, tokenizer=tokenizer,
                                                             load=self.method.load_options(plan), **plan.model.options)
        if self.method.adapter and self.main and base_needs_saving(plan):
            save_base(model, plan.output_dir)  # random-weight base: the adapter needs it to load later
        model = self.method.apply(model, plan)
        config = getattr(model, "config", None)
        self.saved_pad_id = getattr(config, "pad_token_id", None)
        if config is not None:
            config.use_cache = False  # a KV cache would also switch off packed-sequence masking
            # transformers checks every forward for a pad id without an attention mask (a warning, and a device
            # sync per step); packed rows need no mask, so the check is off while training (restored at save).
            config.pad_token_id = None
        if self.spec.gradient_checkpointing:
            enable_checkpointing(model)
        return model

    def setup_rows(self) -> None:
        """Samples packed into seq_len-token rows (or one per row), in a seeded order per epoch, sliced per rank."""
        from impruver.train.data import Batches, make_rows, read_samples

        spec, rank = self.spec, self.accelerator.process_index
        self.seq_len = seq_len = self.plan.seq_len
        self.train_samples = read_samples(self.plan.train_path, max_len=seq_len)
        if len(self.train_samples) == 0:
            raise RunError(f"{self.plan.train_path}: no trainable samples; check the dataset and its length limit")
        val_path = Path(self.plan.val_path)
        self.val_samples = read_samples(val_path, max_len=seq_len) if val_path.is_file() else None
        self.has_val = self.val_samples is not None and len(self.val_samples) > 0
        self.batches = Batches(make_rows(self.train_samples, seq_len=seq_len, packing=spec.packing),
                               spec.batch_size, spec.seed, self.world, rank)
        self.val_batches = Batches(make_rows(self.val_samples, seq_len=seq_len, packing=spec.packing),
                                   spec.batch_size, spec.seed, self.world, rank, shuffle=False) if self.has_val else None
        self.accum = spec.grad_accum
        self.total_steps = spec.max_steps or max(1, math.ceil(spec.epochs * self.batches.per_epoch / self.accum))
        self.pad_id = _pad_id(self.tokenizer)
        log.info("%d train samples in %d rows of %d tokens (%s), %d micro-batches per epoch; %d optimizer steps "
                 "on %d process(es), strategy %s", len(self.train_samples), len(self.batches.rows), seq_len,
                 "packed" if spec.packing else "padded", self.batches.per_epoch, self.total_steps, self.world,
                 self.strategy.name)

    def loss_module(self, model: Any) -> Any:
        """The objective as a module around the model (prepared and wrapped whole): summed token cross-entropy.

        The loss is part of the wrapped module so that the output head runs only where there are targets and
        DDP / FSDP hooks, autocast and torch.compile see the whole computation (see :mod:`impruver.train.loss`).
        """
        from impruver.train.loss import TokenLoss

        return TokenLoss(model)

    def build_optimizer(self, module: Any) -> Any:
        from impruver import registry
        from impruver.train.optim import param_groups

        spec = self.spec
        return registry.lookup("optimizers", spec.optimizer)(
            params=param_groups(module, spec.weight_decay), lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps,
            weight_decay=spec.weight_decay)

    def setup_optimizer(self) -> None:
        """Optimizer and schedule (stepped by hand: the schedule counts optimizer steps across all ranks).

        The optimizer is built on the unwrapped module and prepared together with it: FSDP2 swaps the parameters
        for their shards and rewrites the optimizer's parameter groups in the same call.
        """
        import torch

        from impruver import registry

        module = self.loss_module(self.model)
        optimizer = self.build_optimizer(module)
        # On the torch optimizer itself: accelerate's wrappers (and DeepSpeed's ZeRO optimizer) keep its groups.
        self.scheduler = registry.lookup("schedulers", self.spec.scheduler)(
            optimizer=optimizer, num_training_steps=self.total_steps, warmup_steps=self.spec.warmup_steps,
            min_lr_ratio=self.spec.min_lr_ratio)
        self.loss_model, self.optimizer = self.strategy.prepare(self.accelerator, module, optimizer)
        self.model = self.accelerator.unwrap_model(self.loss_model).model  # the model itself, for saving
        compile_model = self.spec.compile if self.spec.compile != "auto" else self.accelerator.device.type == "cuda"
        self.forward_model = torch.compile(self.loss_model) if compile_model else self.loss_model

    def resume(self) -> None:
        """Weights, optimizer, schedule and RNG from the last good checkpoint; the data order follows the step.

        The plan is compared with the checkpoint's first (:func:`~impruver.train.checkpoint.plan_changes`): a
        change of the optimisation not named in ``train.resume_changes`` refuses the resume. The optimizer's
        settings and the schedule then come from this plan, applied from the checkpoint's step. A damaged
        checkpoint (missing or truncated file) is reported and the one before it is used (``resume=auto``).
        """
        from impruver.train import checkpoint as ckpt

        spec = self.spec
        signature = {"seed": spec.seed, "batch_size": spec.batch_size, "grad_accum": self.accum,
                     "world_size": self.world, "seq_len": self.seq_len, "packing": spec.packing,
                     "rows": len(self.batches.rows), "total_steps": self.total_steps}
        self.state = ckpt.TrainState(signature=signature)
        candidates = ckpt.resume_candidates(spec.resume, self.plan.output_dir)
        # The optimizer's settings as this plan builds them (lr, weight decay, betas, ...): loading a checkpoint
        # puts the saved ones back in its parameter groups; the plan's are restored after it.
        planned = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        damaged: list[str] = []
        for folder in candidates:
            try:
                saved = ckpt.read_state(folder)
                changes = ckpt.plan_changes(folder, self.plan, signature, saved.signature)
                ckpt.accepted_changes(folder, changes, list(spec.resume_changes))  # before loading anything
                state = ckpt.load_checkpoint(folder, strategy=self.strategy, accelerator=self.accelerator,
                                             model=self.loss_model, optimizer=self.optimizer,
                                             scheduler=self.scheduler)
            except ckpt.DamagedCheckpoint as exc:
                if spec.resume != "auto":
                    raise RunError(f"train.resume: {exc}; resume from another checkpoint (train.resume=auto "
                                   "takes the latest good one) or start over with train.resume=never") from None
                log.warning("%s: resuming from the checkpoint before it", exc)
                damaged.append(str(exc))
                continue
            self.state = state
            self.state.signature = signature
            self.state.resumes.append({"step": state.step, "from": str(folder),
                                       "changes": {k: list(v) for k, v in changes.items()}})
            self.apply_planned_settings(planned)
            log.info("resuming from %s at step %d of %d%s", folder, state.step, self.total_steps,
                     "".join(f"; {k}: {old} -> {new}" for k, (old, new) in changes.items()))
            return
        if damaged:
            raise RunError("train.resume=auto: no checkpoint in "
                           f"{self.layout.checkpoints} can be used:\n" + "\n".join(f"  - {d}" for d in damaged) +
                           "\nStart over with train.resume=never (the damaged folders can be deleted).")
        if spec.resume == "auto":
            log.info("train.resume=auto: no checkpoint in %s, starting from step 0", self.plan.output_dir)

    def apply_planned_settings(self, planned: list[dict[str, Any]]) -> None:
        """After loading a checkpoint: the optimizer's settings from this plan, the schedule at the saved step.

        ``planned`` holds each parameter group's settings as this plan built them. The schedule's position
        (``last_epoch``) is the checkpoint's; its shape (warmup, length, kind) and peak LR are this plan's, so the
        LR from this step on is what a run planned this way from the start would use. Unchanged settings restore
        exactly what was loaded: an uninterrupted and a resumed run stay bitwise equal.
        """
        groups, scheduler = self.optimizer.param_groups, self.scheduler
        if len(groups) != len(planned):
            raise RunError(f"train.resume: the checkpoint's optimizer has {len(groups)} parameter groups, this "
                           f"plan builds {len(planned)}; start over with train.resume=never")
        for group, settings in zip(groups, planned):
            group.update({k: v for k, v in settings.items() if k not in ("lr", "initial_lr")})
            group["initial_lr"] = settings.get("initial_lr", settings["lr"])
        scheduler.base_lrs = [group["initial_lr"] for group in groups]
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is not None:  # LambdaLR (every built-in schedule): LR = peak x factor(step)
            lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, lambdas)]
            for group, lr in zip(groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs

    def setup_metrics(self) -> None:
        from impruver.train.metrics import MetricsWriter

        self.writer = MetricsWriter(self.plan.output_dir, enabled=self.main, report_to=list(self.spec.report_to),
                                    resume_step=self.state.step, run_name=Path(self.plan.output_dir).name,
                                    config=self.plan.to_dict(), accelerator=self.accelerator)
        self.writer.write({"event": "start", "step": self.state.step, "total_steps": self.total_steps,
                           "world_size": self.world, "train_samples": len(self.train_samples),
                           "rows": len(self.batches.rows), "seq_len": self.seq_len,
                           "device": str(self.accelerator.device), "strategy": self.strategy.name,
                           "mixed_precision": self.plan.hardware.mixed_precision})

    # -- the loop ------------------------------------------------------------------------------------------------

    def micro_batch(self, micro: int) -> dict[str, Any]:
        """The collated rows of global micro-batch number ``micro`` for this rank."""
        from impruver.train.data import collate

        epoch, index = divmod(micro, self.batches.per_epoch)
        return collate(self.train_samples, self.batches.get(epoch, index), pad_id=self.pad_id,
                       seq_len=self.seq_len, packed=self.spec.packing)

    def step_loss(self, batch: dict[str, Any]) -> Any:
        """The objective of one micro-batch: the summed loss over its target tokens (a 0-d fp32 tensor)."""
        return token_loss_sum(self.forward_model, batch, self.accelerator.device)

    def train(self) -> None:
        """Accumulate ``grad_accum`` micro-batches, clip, step; log, evaluate and checkpoint by step count."""
        import torch

        from impruver.train.metrics import format_line
        from impruver.ui import interactive, progress

        acc, spec, state, accum, world = self.accelerator, self.spec, self.state, self.accum, self.world
        total = self.total_steps
        self.loss_model.train()
        self.started, self.tokens_at_start, start_step = time.perf_counter(), state.tokens, state.step
        # The window's summed loss stays on the device: reading it (a device sync) happens only when logging.
        # A resumed run continues the window its checkpoint saved (summed over ranks: the main rank carries it).
        saved = state.window if self.main else {}
        window_loss = torch.full((), float(saved.get("loss_sum", 0.0)), device=acc.device)
        window_targets, window_tokens = int(saved.get("targets", 0)), int(saved.get("tokens", 0))
        window_start = time.perf_counter() - float(state.window.get("seconds", 0.0))
        self.last_eval, self.last_eval_step = None, -1
        with progress() as bar:
            task = bar.add_task("training", total=total, completed=state.step, info="")
            while state.step < total:
                parts = [self.micro_batch(state.step * accum + k) for k in range(accum)]
                # Every rank divides by the global number of target tokens of this step (DDP averages
                # gradients, hence the factor `world`): the step's loss is the token-weighted mean over all
                # its micro-batches. `scale` undoes what a strategy's engine divides by itself (DeepSpeed: accum).
                n_targets, n_tokens = global_counts(acc, sum(p["n_targets"] for p in parts),
                                                    sum(p["n_tokens"] for p in parts))
                scale = world * self.strategy.loss_scale(self.plan) / max(n_targets, 1)
                step_loss = torch.zeros((), device=acc.device)
                for k, part in enumerate(parts):
                    sync = contextlib.nullcontext() if k == accum - 1 else acc.no_sync(self.loss_model)
                    with sync:
                        loss_sum = self.step_loss(part)
                        acc.backward(loss_sum * scale)
                    step_loss += loss_sum.detach()
                grad_norm = None
                if spec.max_grad_norm:
                    grad_norm = acc.clip_grad_norm_(self.loss_model.parameters(), spec.max_grad_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                if not acc.optimizer_step_was_skipped:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.tokens += n_tokens
                window_loss += step_loss
                window_targets += n_targets
                window_tokens += n_tokens

                if state.step % spec.logging_steps == 0 or state.step == total or state.step == 1:
                    now = time.perf_counter()
                    speed = window_tokens / max(now - window_start, 1e-9)
                    eta = (now - self.started) / max(state.step - start_step, 1) * (total - state.step)
                    record = {"event": "train", "step": state.step,
                              "epoch": round(state.step * accum / self.batches.per_epoch, 4),
                              "loss": float(acc.reduce(window_loss, "sum")) / max(window_targets, 1),
                              "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                              "tokens": state.tokens, "tokens_per_s": speed,
                              "elapsed_s": state.elapsed_s + now - self.started, "eta_s": eta, "world_size": world,
                              **self.train_metrics()}
                    self.writer.write(record)
                    bar.update(task, completed=state.step, info=f"loss {record['loss']:.4f} lr {lr:.2e} "
                               f"{speed:,.0f} tok/s")
                    if not interactive():
                        log.info(format_line(record, total))
                    window_loss = torch.zeros((), device=acc.device)
                    window_targets, window_tokens, window_start = 0, 0, time.perf_counter()

                eval_now = self.has_val and spec.eval_steps and state.step % spec.eval_steps == 0
                save_now = spec.save_steps and state.step % spec.save_steps == 0 and state.step < total
                if eval_now or save_now:
                    self.last_eval, self.last_eval_step = self.evaluate(), state.step
                    if self.last_eval is not None:
                        self.writer.write({"event": "eval", "step": state.step, "eval_loss": self.last_eval})
                        log.info("step %d: eval loss %.4f", state.step, self.last_eval)
                    state.history.append({"step": state.step, "eval_loss": self.last_eval})
                if save_now:
                    self.window = {"loss_sum": float(acc.reduce(window_loss, "sum")), "targets": window_targets,
                                   "tokens": window_tokens, "seconds": time.perf_counter() - window_start}
                    self.save_checkpoint(self.last_eval)

    def train_metrics(self) -> dict[str, float]:
        """The objective's own metrics of the logging window, added to each train record (SFT: none)."""
        return {}

    def summary_metrics(self) -> dict[str, Any]:
        """The objective's own results, added to the run summary at the end (SFT: none)."""
        return {}

    def evaluate(self) -> float | None:
        """The token-weighted validation loss over all ranks (None without validation data)."""
        if not self.has_val:
            return None
        return eval_loss(self.forward_model, self.val_samples, self.val_batches, accelerator=self.accelerator,
                         pad_id=self.pad_id, seq_len=self.seq_len, packed=self.spec.packing)

    def save_checkpoint(self, loss: float | None) -> None:
        """Checkpoint the state at this step (every rank takes part) and drop the ones no longer kept."""
        from impruver.train import checkpoint as ckpt

        state = self.state
        state.eval_loss = loss
        if loss is not None and (state.best_eval_loss is None or loss < state.best_eval_loss):
            state.best_step, state.best_eval_loss = state.step, loss
        # What the checkpoint records as done so far: the training time of earlier runs plus this one's, and the
        # open logging window (set by the loop just before), so a resume continues both.
        saved = replace(state, elapsed_s=state.elapsed_s + time.perf_counter() - self.started,
                        window=dict(getattr(self, "window", {})))
        ckpt.save_checkpoint(self.plan.output_dir, strategy=self.strategy, accelerator=self.accelerator,
                             model=self.loss_model, optimizer=self.optimizer, scheduler=self.scheduler, state=saved,
                             plan_text=self.plan.to_yaml() if self.main else None)
        if self.main:
            ckpt.rotate(self.plan.output_dir, keep=self.spec.save_total_limit, best_step=state.best_step)
        self.accelerator.wait_for_everyone()

    # -- the end -------------------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """A final evaluation, the best checkpoint's weights if they beat the last ones, then save; the summary."""
        from impruver.train import checkpoint as ckpt
        from impruver.train.metrics import plot_loss
        from impruver.train.outputs import save_model, write_card

        state, plan, acc = self.state, self.plan, self.accelerator
        this_run_s = time.perf_counter() - self.started
        state.elapsed_s += this_run_s
        final_eval = self.last_eval if self.last_eval_step == state.step else self.evaluate()
        if final_eval is not None and self.last_eval_step != state.step:
            self.writer.write({"event": "eval", "step": state.step, "eval_loss": final_eval})
        best_step, result_eval = state.step, final_eval
        if (self.spec.load_best_at_end and final_eval is not None and state.best_eval_loss is not None
                and state.best_eval_loss < final_eval and state.best_step is not None):
            folder = ckpt.checkpoint_dir(plan.output_dir, state.best_step)
            if folder.is_dir():
                self.strategy.load_weights(acc, folder, model=self.loss_model)
                best_step, result_eval = state.best_step, state.best_eval_loss
                log.info("loaded the best checkpoint (step %d, eval loss %.4f; the last step had %.4f)",
                         best_step, state.best_eval_loss, final_eval)
        train_loss = _last_train_loss(self.layout.metrics) if self.main else None
        summary = {"output_dir": plan.output_dir, "steps": state.step, "train_loss": train_loss,
                   "eval_loss": result_eval, "best_step": best_step if result_eval is not None else None,
                   "tokens": state.tokens, "world_size": self.world, "train_samples": len(self.train_samples),
                   "val_samples": len(self.val_samples) if self.has_val else 0,
                   "elapsed_s": round(state.elapsed_s, 2),
                   "tokens_per_s": round((state.tokens - self.tokens_at_start) / max(this_run_s, 1e-9), 1),
                   **self.summary_metrics()}
        if state.resumes:
            summary["resumes"] = state.resumes  # each resume's step, checkpoint and the changes it applied
        config = getattr(self.model, "config", None)
        if config is not None:
            config.pad_token_id = self.saved_pad_id
        full_state = self.strategy.full_state_dict(acc, self.loss_model)  # a gather: every rank takes part
        if self.main:
            save_model(self.model, self.tokenizer, plan, adapter=self.method.adapter, state_dict=full_state)
            self.writer.write({"event": "end", **{k: v for k, v in summary.items() if k != "output_dir"}})
            plot_loss(plan.output_dir)
            write_card(plan, summary)
            if state.resumes:
                note_resumes(self.layout.card, state.resumes)
            # What ran, as accelerate saw it: a strategy that asked for sharding and got none would show here.
            strategy = {**self.strategy.describe(plan), "distributed_type": str(acc.distributed_type.value)}
            record = {**summary, "strategy": strategy}
            atomic_write_text(self.layout.run_record, json.dumps(record, indent=1))
            log.info("saved %s to %s", "the adapter" if self.method.adapter else "the model", plan.output_dir)
        self.writer.close()
        acc.wait_for_everyone()
        acc.end_training()
        return summary


def resume_lines(resumes: list[dict[str, Any]]) -> list[str]:
    """'resumed at step 10 with train.lr 0.003 -> 1e-05' for each resume of a run."""
    lines = []
    for r in resumes:
        changes = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in r.get("changes", {}).items())
        lines.append(f"resumed at step {r['step']}" + (f" with {changes}" if changes else " (no changes)"))
    return lines


def note_resumes(card: Path, resumes: list[dict[str, Any]]) -> None:
    """Add the run's resumes to its model card: the settings above are this plan's, in force from those steps."""
    if not card.is_file():
        return
    text = card.read_text(encoding="utf-8").rstrip("\n")
    lines = "\n".join(f"- {line}" for line in resume_lines(resumes))
    atomic_write_text(card, f"{text}\n\n## Resumes\n\nThe settings above apply from each resume on:\n\n{lines}\n")


def memory_problem(plan: Plan) -> str | None:
    """Why the memory plan says the run will not fit the hardware profile, with settings that would; else None."""
    estimate = plan.memory
    if estimate is None or estimate.fits is not False or not plan.train.memory_check:
        return None
    fixes = "\n".join(f"      {s}" for s in estimate.suggestions) or \
        "      nothing in impruver's list fits: a larger GPU (hardware=gpu80gb) or several (hardware=fsdp)"
    return (f"memory: the plan needs ~{estimate.total_gib:.1f} GiB per GPU (weights {estimate.weights_gib}, "
            f"gradients {estimate.gradients_gib}, optimizer {estimate.optimizer_gib}, activations "
            f"{estimate.activations_gib}, overhead {estimate.overhead_gib}) but hardware '{plan.hardware.name}' "
            f"has {estimate.budget_gib} GiB. Settings that fit:\n{fixes}\n"
            "    (train.memory_check=false runs it anyway)")


def global_counts(accelerator: Any, n_targets: int, n_tokens: int) -> tuple[int, int]:
    """Target and real-token counts of this optimizer step summed over every rank (no device sync for one)."""
    if accelerator.num_processes == 1:
        return n_targets, n_tokens
    import torch

    counts = accelerator.reduce(torch.tensor([n_targets, n_tokens], device=accelerator.device), "sum")
    return int(counts[0]), int(counts[1])


def enable_checkpointing(model: Any) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant: works under peft and DDP)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise RunError("train.gradient_checkpointing: this model has no checkpointing switch; set it to false")


def token_loss_sum(loss_model: Any, batch: dict[str, Any], device: Any) -> Any:
    """Sum of next-token cross-entropy over the batch's target tokens (a 0-d fp32 tensor).

    ``loss_model`` is a :class:`~impruver.train.loss.TokenLoss` (possibly wrapped by accelerate / compiled).
    """
    inputs = {"input_ids": _to(batch["input_ids"], device), "position_ids": _to(batch["position_ids"], device),
              "targets": _to(batch["targets"], device)}  # [batch, length] each; targets already shifted
    if "attention_mask" in batch:
        inputs["attention_mask"] = _to(batch["attention_mask"], device)
    return loss_model(**inputs)


def eval_loss(model: Any, samples: Samples, batches: Batches, *, accelerator: Any, pad_id: int, seq_len: int,
              packed: bool) -> float:
    """Token-weighted mean loss over the whole validation set (all ranks)."""
    import torch

    from impruver.train.data import collate

    model.eval()
    total = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        for index in range(batches.per_epoch):
            rows = batches.get(0, index)
            if not rows:
                continue
            batch = collate(samples, rows, pad_id=pad_id, seq_len=seq_len, packed=packed)
            total += token_loss_sum(model, batch, accelerator.device)
            count += batch["n_targets"]
    model.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return float(total / count.clamp(min=1))


def _to(tensor: Any, device: Any) -> Any:
    """Host-to-device copy that does not block the host (pinned memory) on a GPU."""
    if getattr(device, "type", str(device)) == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _last_train_loss(metrics: Path) -> float | None:
    from impruver.train.metrics import read_metrics

    losses = [r["loss"] for r in read_metrics(metrics) if r.get("event") == "train"]
    return losses[-1] if losses else None
