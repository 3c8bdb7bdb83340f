"""The training recipe: ``impruver train`` and the main job (``impruver`` with overrides).

One linear recipe, read top to bottom: checks -> accelerator -> data -> seed -> tokenizer -> model -> method ->
rows -> optimizer / schedule -> loop (accumulate, clip, step, log, evaluate, checkpoint) -> best -> save.

The loop runs on ``accelerate.Accelerator``: one process here, DDP / FSDP / DeepSpeed when ``impruver.launch``
starts several workers on the frozen plan. Only the main process writes files. The loss of an optimizer step is
token-weighted over every micro-batch of every rank: sum of per-token cross-entropy / number of target tokens,
so gradient accumulation and packing change nothing but speed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from impruver import registry
from impruver.errors import RunError
from impruver.files import atomic_write_text
from impruver.plan import environment_problems

if TYPE_CHECKING:
    from impruver.plan import Plan
    from impruver.train.data import Batches, Samples

log = logging.getLogger("impruver")


def run(plan: Plan, *, worker: bool = False, **options: Any) -> dict[str, Any]:
    """Train what ``plan`` describes and leave the model, tokenizer, plan, metrics and card in its output_dir.

    Args:
        plan: the validated plan.
        worker: this process is one rank started by ``impruver.launch`` on a plan (and data) already written.
        **options: command-line flags of the stage (``--force`` recomposes the data).

    Returns:
        A summary: output_dir, steps, train_loss, eval_loss, best_step, tokens, world_size, elapsed_s.

    Raises:
        RunError: the machine cannot run the plan, or the memory plan says it will not fit.
    """
    # 1. Checks that need nothing loaded: missing packages, no GPU, a memory estimate over the budget.
    problems = [str(p) for p in environment_problems(plan)]
    memory = memory_problem(plan)
    if memory:
        problems.append(memory)
    if problems:
        raise RunError("this machine cannot run the plan:\n" + "\n".join(f"  - {p}" for p in problems))
    from impruver.train.metrics import check_reporters

    check_reporters(list(plan.train.report_to))

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from impruver.train import checkpoint as ckpt
    from impruver.train.data import Batches, make_rows, read_samples
    from impruver.train.loss import TokenLoss
    from impruver.components import method_of
    from impruver.train.metrics import MetricsWriter, format_line, plot_loss
    from impruver.train.optim import param_groups
    from impruver.train.outputs import base_needs_saving, save_base, save_model, write_card

    if not worker:
        # accelerate keeps one global state per process: a second run in the same process (a notebook, a sweep,
        # the tests) with other precision settings must start from a clean one.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    try:  # e.g. train.ddp={ddp_find_unused_parameters: true}
        handlers = [DistributedDataParallelKwargs(**{k.removeprefix("ddp_"): v for k, v in plan.train.ddp.items()})]
    except TypeError as exc:
        raise RunError(f"train.ddp: {exc} (keys are DistributedDataParallel arguments, e.g. "
                       "ddp_find_unused_parameters)") from None
    accelerator = Accelerator(cpu=plan.hardware.device == "cpu", mixed_precision=plan.hardware.mixed_precision,
                              kwargs_handlers=handlers)
    main, world = accelerator.is_main_process, accelerator.num_processes
    train_spec = plan.train

    # 2. Data: composed once, by the main process first (the others then find it up to date; workers started by
    # impruver.launch find it done), and the plan frozen beside the outputs.
    from impruver.data import pipeline

    if not worker:
        with accelerator.main_process_first():
            if options.get("force") and main:
                pipeline.run(plan, force=True)  # --force: compose again even when the data is up to date
            else:
                pipeline.ensure_composed(plan)
        if main:
            plan.write()

    # 3. Seed, tokenizer, model, method.
    set_seed(train_spec.seed)
    tokenizer = pipeline.load_composed_tokenizer(plan)
    method = method_of(plan)
    load = method.load_options(plan)
    model = registry.lookup("models", plan.model.builder)(spec=plan.model, tokenizer=tokenizer, load=load,
                                                         **plan.model.options)
    adapter = method.adapter
    if adapter and main and base_needs_saving(plan):
        save_base(model, plan.output_dir)  # random-weight base: the adapter needs it to load later
    model = method.apply(model, plan)
    config = getattr(model, "config", None)
    saved_pad_id = getattr(config, "pad_token_id", None)
    if config is not None:
        config.use_cache = False  # a KV cache would also switch off packed-sequence masking
        # transformers checks every forward for a pad id without an attention mask (a warning, and a device sync
        # per step); packed rows need no mask, so the check is switched off while training (restored at save).
        config.pad_token_id = None
    if train_spec.gradient_checkpointing:
        enable_checkpointing(model)

    # 4. Rows: samples packed into seq_len-token rows (or one per row), in a seeded order per epoch.
    seq_len = plan.seq_len
    train_samples = read_samples(plan.train_path, max_len=seq_len)
    if len(train_samples) == 0:
        raise RunError(f"{plan.train_path}: no trainable samples; check the dataset and its length limit")
    val_path = Path(plan.val_path)
    val_samples = read_samples(val_path, max_len=seq_len) if val_path.is_file() else None
    has_val = val_samples is not None and len(val_samples) > 0
    batches = Batches(make_rows(train_samples, seq_len=seq_len, packing=train_spec.packing),
                      train_spec.batch_size, train_spec.seed, world, accelerator.process_index)
    val_batches = Batches(make_rows(val_samples, seq_len=seq_len, packing=train_spec.packing),
                          train_spec.batch_size, train_spec.seed, world, accelerator.process_index,
                          shuffle=False) if has_val else None
    accum = train_spec.grad_accum
    total_steps = train_spec.max_steps or max(1, math.ceil(train_spec.epochs * batches.per_epoch / accum))
    pad_id = _pad_id(tokenizer)
    log.info("%d train samples in %d rows of %d tokens (%s), %d micro-batches per epoch; %d optimizer steps "
             "on %d process(es)", len(train_samples), len(batches.rows), seq_len,
             "packed" if train_spec.packing else "padded", batches.per_epoch, total_steps, world)

    # 5. Optimizer and schedule (stepped by hand: the schedule counts optimizer steps across all ranks). The model
    # is placed (and wrapped for DDP / FSDP) first, so the optimizer sees the parameters where they will live.
    # The loss is part of the wrapped module: the output head runs only where there are targets (see train.loss).
    loss_model = accelerator.prepare(TokenLoss(model))
    optimizer = registry.lookup("optimizers", train_spec.optimizer)(
        params=param_groups(loss_model, train_spec.weight_decay), lr=train_spec.lr, betas=tuple(train_spec.betas),
        eps=train_spec.eps, weight_decay=train_spec.weight_decay)
    scheduler = registry.lookup("schedulers", train_spec.scheduler)(
        optimizer=optimizer, num_training_steps=total_steps, warmup_steps=train_spec.warmup_steps,
        min_lr_ratio=train_spec.min_lr_ratio)
    optimizer = accelerator.prepare(optimizer)
    unwrapped = accelerator.unwrap_model(loss_model).model  # the model itself, for checkpoints and saving
    compile_model = train_spec.compile if train_spec.compile != "auto" else accelerator.device.type == "cuda"
    forward_model = torch.compile(loss_model) if compile_model else loss_model

    # 6. Resume: weights, optimizer, schedule and RNG from the last checkpoint; the data order follows the step.
    signature = {"seed": train_spec.seed, "batch_size": train_spec.batch_size, "grad_accum": accum,
                 "world_size": world, "seq_len": seq_len, "packing": train_spec.packing,
                 "rows": len(batches.rows), "total_steps": total_steps}
    state = ckpt.TrainState(signature=signature)
    resume_from = ckpt.resolve_resume(train_spec.resume, plan.output_dir)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model=unwrapped, optimizer=optimizer, scheduler=scheduler)
        ckpt.check_signature(state.signature, signature, resume_from)
        state.signature = signature
        log.info("resuming from %s at step %d of %d", resume_from, state.step, total_steps)
    elif train_spec.resume == "auto":
        log.info("train.resume=auto: no checkpoint in %s, starting from step 0", plan.output_dir)
    writer = MetricsWriter(plan.output_dir, enabled=main, report_to=list(train_spec.report_to),
                           resume_step=state.step, run_name=Path(plan.output_dir).name, config=plan.to_dict())
    writer.write({"event": "start", "step": state.step, "total_steps": total_steps, "world_size": world,
                  "train_samples": len(train_samples), "rows": len(batches.rows), "seq_len": seq_len,
                  "device": str(accelerator.device), "mixed_precision": plan.hardware.mixed_precision})

    def evaluate() -> float | None:
        if not has_val:
            return None
        return eval_loss(forward_model, val_samples, val_batches, accelerator=accelerator, pad_id=pad_id,
                         seq_len=seq_len, packed=train_spec.packing)

    def save_checkpoint(loss: float | None) -> None:
        state.eval_loss = loss
        if loss is not None and (state.best_eval_loss is None or loss < state.best_eval_loss):
            state.best_step, state.best_eval_loss = state.step, loss
        if main:
            ckpt.save_checkpoint(plan.output_dir, model=unwrapped, optimizer=optimizer, scheduler=scheduler,
                                 state=state)
            ckpt.rotate(plan.output_dir, keep=train_spec.save_total_limit, best_step=state.best_step)
        accelerator.wait_for_everyone()

    # 7. The loop: accumulate `accum` micro-batches, clip, step; log, evaluate and checkpoint by step count.
    from impruver.ui import interactive, progress

    loss_model.train()
    started, tokens_at_start, start_step = time.perf_counter(), state.tokens, state.step
    # The window's summed loss stays on the device: reading it (a device sync) happens only when logging.
    window_loss = torch.zeros((), device=accelerator.device)
    window_targets, window_tokens, window_start = 0, 0, time.perf_counter()
    last_eval: float | None = None
    last_eval_step = -1
    with progress() as bar:
        task = bar.add_task("training", total=total_steps, completed=state.step, info="")
        while state.step < total_steps:
            micro = [state.step * accum + k for k in range(accum)]
            parts = [_collate(train_samples, batches, m, pad_id=pad_id, seq_len=seq_len,
                              packed=train_spec.packing) for m in micro]
            # Every rank divides by the global number of target tokens of this step (DDP averages gradients,
            # hence the factor `world`): the step's loss is the token-weighted mean over all its micro-batches.
            n_targets, n_tokens = global_counts(accelerator, sum(p["n_targets"] for p in parts),
                                                sum(p["n_tokens"] for p in parts))
            step_loss = torch.zeros((), device=accelerator.device)
            for k, part in enumerate(parts):
                sync = contextlib.nullcontext() if k == accum - 1 else accelerator.no_sync(loss_model)
                with sync:
                    loss_sum = token_loss_sum(forward_model, part, accelerator.device)
                    accelerator.backward(loss_sum * world / max(n_targets, 1))
                step_loss += loss_sum.detach()
            grad_norm = None
            if train_spec.max_grad_norm:
                grad_norm = accelerator.clip_grad_norm_(loss_model.parameters(), train_spec.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += n_tokens
            window_loss += step_loss
            window_targets += n_targets
            window_tokens += n_tokens

            if state.step % train_spec.logging_steps == 0 or state.step == total_steps or state.step == 1:
                now = time.perf_counter()
                speed = window_tokens / max(now - window_start, 1e-9)
                eta = (now - started) / max(state.step - start_step, 1) * (total_steps - state.step)
                record = {"event": "train", "step": state.step,
                          "epoch": round(state.step * accum / batches.per_epoch, 4),
                          "loss": float(accelerator.reduce(window_loss, "sum")) / max(window_targets, 1),
                          "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                          "tokens": state.tokens, "tokens_per_s": speed,
                          "elapsed_s": state.elapsed_s + now - started, "eta_s": eta, "world_size": world}
                writer.write(record)
                bar.update(task, completed=state.step, info=f"loss {record['loss']:.4f} lr {lr:.2e} "
                           f"{speed:,.0f} tok/s")
                if main and not interactive():
                    log.info(format_line(record, total_steps))
                window_loss = torch.zeros((), device=accelerator.device)
                window_targets, window_tokens, window_start = 0, 0, time.perf_counter()

            eval_now = has_val and train_spec.eval_steps and state.step % train_spec.eval_steps == 0
            save_now = train_spec.save_steps and state.step % train_spec.save_steps == 0 and state.step < total_steps
            if eval_now or save_now:
                last_eval, last_eval_step = evaluate(), state.step
                if last_eval is not None:
                    writer.write({"event": "eval", "step": state.step, "eval_loss": last_eval})
                    if main:
                        log.info("step %d: eval loss %.4f", state.step, last_eval)
                state.history.append({"step": state.step, "eval_loss": last_eval})
            if save_now:
                save_checkpoint(last_eval)

    # 8. The end: a final evaluation, the best checkpoint's weights if they beat the last ones, then save.
    this_run_s = time.perf_counter() - started
    state.elapsed_s += this_run_s
    final_eval = last_eval if last_eval_step == state.step else evaluate()
    if final_eval is not None and last_eval_step != state.step:
        writer.write({"event": "eval", "step": state.step, "eval_loss": final_eval})
    best_step, result_eval = state.step, final_eval
    if (train_spec.load_best_at_end and final_eval is not None and state.best_eval_loss is not None
            and state.best_eval_loss < final_eval and state.best_step is not None):
        folder = ckpt.checkpoint_dir(plan.output_dir, state.best_step)
        if folder.is_dir():
            ckpt.load_trainable(folder, unwrapped)
            best_step, result_eval = state.best_step, state.best_eval_loss
            log.info("loaded the best checkpoint (step %d, eval loss %.4f; the last step had %.4f)",
                     best_step, state.best_eval_loss, final_eval)
    train_loss = _last_train_loss(plan.output_dir) if main else None
    summary = {"output_dir": plan.output_dir, "steps": state.step, "train_loss": train_loss,
               "eval_loss": result_eval, "best_step": best_step if result_eval is not None else None,
               "tokens": state.tokens, "world_size": world, "train_samples": len(train_samples),
               "val_samples": len(val_samples) if has_val else 0, "elapsed_s": round(state.elapsed_s, 2),
               "tokens_per_s": round((state.tokens - tokens_at_start) / max(this_run_s, 1e-9), 1)}
    if config is not None:
        config.pad_token_id = saved_pad_id
    # Sharded runs (FSDP, DeepSpeed ZeRO-3): every rank takes part in gathering the full weights.
    sharded = plan.hardware.distributed in ("fsdp", "deepspeed_zero3")
    full_state = accelerator.get_state_dict(model) if sharded else None
    if main:
        save_model(unwrapped, tokenizer, plan, adapter=adapter, state_dict=full_state)
        writer.write({"event": "end", **{k: v for k, v in summary.items() if k != "output_dir"}})
        plot_loss(plan.output_dir)
        write_card(plan, summary)
        atomic_write_text(Path(plan.output_dir) / "run.json", json.dumps(summary, indent=1))
        log.info("saved %s to %s", "the adapter" if adapter else "the model", plan.output_dir)
    writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


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


def _collate(samples: Samples, batches: Batches, micro: int, **kwargs: Any) -> dict[str, Any]:
    from impruver.train.data import collate

    epoch, index = divmod(micro, batches.per_epoch)
    return collate(samples, batches.get(epoch, index), **kwargs)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _last_train_loss(output_dir: str) -> float | None:
    from impruver.train.metrics import METRICS_FILE, read_metrics

    losses = [r["loss"] for r in read_metrics(Path(output_dir) / METRICS_FILE) if r.get("event") == "train"]
    return losses[-1] if losses else None
