"""One GPU check, ready to run: throughput and MFU next to ``transformers.Trainer``, a 13B QLoRA step, FSDP.

    python bench/gpu_check.py              # on one H100 / H200: the full check, under 8 minutes; prints JSON
    python bench/gpu_check.py --tiny       # tiny shapes (what CI runs on a CPU, well under a minute)
    python bench/gpu_check.py --budget 300 # total seconds the sections may take (default 450)

Sections, each in its own process group (a crash, an out-of-memory or a timeout is that section's ``error`` in
the JSON, and the next section still runs; a timed-out section's processes are all killed):

* ``throughput``: ``bench/train.py``'s comparison for the gpt2-124m shape and the 760M rugpt3large shape (GPT-2
  24 x 1536, 2048 context), random weights, the same synthetic chats on both sides. impruver: packed rows with
  per-sample position ids, bf16 autocast, fused AdamW, ``torch.compile``; the Trainer: its own padding-free
  packing (``DataCollatorWithFlattening``), bf16, ``torch_compile=True``. Useful tokens/s, step time, peak memory
  and MFU: (6N + 12·L·d·T) FLOPs per token (N without position embeddings, T the row length) times useful
  tokens/s over the GPU's dense bf16 peak (989 TFLOP/s on an H100 or H200; see shared/docs/gpu-facts.md).
* ``qlora``: the ruGPT-3.5-13B preset's shape (GPT-2 family, 40 layers x 5120, 40 heads, vocabulary 50272, the
  preset's LoRA r=16 on c_attn/c_fc/c_proj, 4-bit NF4 with double quantization, 8-bit AdamW, batch 1 x 1024)
  with random weights quantized through bitsandbytes layer by layer on the GPU (as ``from_pretrained`` does
  for a real checkpoint: each Conv1D becomes a ``Linear4bit``), wrapped by impruver's own ``qlora`` method, a
  few optimizer steps. Peak CUDA memory next to ``impruver plan``'s estimate (``make_plan(...).memory``).
* ``fsdp``: ``impruver preset=demo hardware=fsdp hardware.num_processes=1`` through the command line in a
  subprocess, saving a checkpoint on the way and the final weights.

Without CUDA everything runs with tiny shapes on the CPU, and what needs CUDA (bitsandbytes, FSDP on a GPU) is
reported as ``"skipped": "no CUDA"``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA"

# The ruGPT-3.5-13B preset (conf/model/rugpt35_13b.yaml, conf/preset/ruGPT-3.5/13B_lora_saiga2.yaml).
QLORA_13B = {"arch": {"family": "gpt2", "n_layer": 40, "n_embd": 5120, "n_head": 40, "n_positions": 2048,
                      "vocab_size": 50272},
             "max_tokens": 1024, "batch_size": 1, "optimizer": "adamw_8bit", "steps": 4}
QLORA_TINY = {"arch": {"family": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 256,
                       "vocab_size": 4096},
              "max_tokens": 256, "batch_size": 2, "optimizer": "adamw", "steps": 2}

# name -> (seconds it may take at most, what it runs); the last throughput shape takes what the budget leaves.
SECTIONS_GPU: list[tuple[str, float]] = [("throughput:gpt2-124m", 170), ("qlora", 150), ("fsdp", 100),
                                         ("throughput:rugpt3large", 240)]
SECTIONS_TINY: list[tuple[str, float]] = [("throughput:tiny", 120), ("qlora", 60), ("fsdp", 120)]
# bench/train.py arguments per shape (steps, untimed warmup steps, and for the CPU fewer chats and rows)
TRAIN_ARGS = {"gpt2-124m": ["--steps", "30", "--warmup", "6"], "rugpt3large": ["--steps", "20", "--warmup", "5"],
              "tiny": ["--steps", "3", "--warmup", "1", "--chats", "60", "--rows", "2", "--trainer-batch", "4"]}


def bench_train() -> Any:
    """bench/train.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("impruver_bench_train", ROOT / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


# -- sections (each runs in its own process: python gpu_check.py --section NAME) ----------------------------------


def throughput(shape: str, cuda: bool) -> dict[str, Any]:
    """impruver against the Trainer on one shape (bench/train.py), both packed and compiled on a GPU."""
    train = bench_train()
    argv = ["--shape", shape, *TRAIN_ARGS[shape], "--trainer-collator", "flatten"]
    argv += ["--trainer-compile"] if cuda else []
    return train.compare(train.parser().parse_args(argv))


def qlora_plan(work: Path, shape: dict[str, Any], cuda: bool) -> Any:
    """The validated plan of the QLoRA check: its memory estimate is what `impruver plan` prints."""
    from impruver.plan import make_plan

    data = work / "unused.jsonl"  # the check feeds random tokens; the plan still names a source
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    gpu_gib = None
    if cuda:
        import torch

        gpu_gib = round(torch.cuda.get_device_properties(0).total_memory / 1024**3, 1)
    return make_plan({
        "output_dir": str(work / "qlora"), "seed": 0,
        "model": {"builder": "hf", "path": None, "weights": "random", "arch": shape["arch"], "dtype": "bfloat16",
                  "chat_template": "saiga", "context_length": shape["arch"]["n_positions"]},
        "tokenizer": {"builder": "bpe", "vocab_size": 4096, "chat_template": "saiga",
                      "special_tokens": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                         "unk_token": "<unk>"}},
        "dataset": {"sources": {"unused": {"path": str(data), "format": "openai"}},
                    "max_tokens": shape["max_tokens"], "val_size": 0, "val_fraction": 0.0},
        "method": {"builder": "qlora", "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True},
                   "lora": {"r": 16, "alpha": 16, "dropout": 0.05, "target_modules": ["c_attn", "c_fc", "c_proj"]}},
        # The plan of the GPU run, also on a CPU (where only its memory estimate is used): qlora needs CUDA.
        "hardware": {"name": "gpu-check", "device": "cuda", "mixed_precision": "bf16", "gpu_memory_gib": gpu_gib},
        "train": {"batch_size": shape["batch_size"], "grad_accum": 1, "max_steps": shape["steps"], "lr": 2e-4,
                  "optimizer": shape["optimizer"], "memory_check": False},
    })


def random_4bit_gpt2(plan: Any) -> Any:
    """A GPT-2 of the plan's architecture with random weights, its Conv1D layers as bitsandbytes Linear4bit.

    The model is built on the meta device (no memory), then each block's four Conv1D layers are replaced by
    ``Linear4bit`` layers whose random bf16 weights are made on the GPU and quantized there one layer at a time
    (peak: one layer in bf16), as transformers' bitsandbytes loader does for a real checkpoint. Embeddings and
    norms are materialised in bf16 on the GPU; impruver's qlora method then casts them to fp32 and freezes them.
    """
    import bitsandbytes as bnb
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    arch, quant = plan.model.arch, plan.method.quantization
    config = GPT2Config(n_layer=arch.n_layer, n_embd=arch.n_embd, n_head=arch.n_head, n_positions=arch.n_positions,
                        vocab_size=arch.vocab_size, use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config).to(torch.bfloat16)
    compute = getattr(torch, quant.compute_dtype)
    for block in model.transformer.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                             (block.mlp, "c_proj")):
            n_in, n_out = getattr(parent, name).weight.shape  # Conv1D stores (in, out); Linear stores (out, in)
            std = 0.02 / math.sqrt(2 * arch.n_layer) if name == "c_proj" else 0.02  # GPT-2's residual scaling
            layer = bnb.nn.Linear4bit(n_in, n_out, bias=True, compute_dtype=compute,
                                      compress_statistics=quant.double_quant, quant_type=quant.quant_type,
                                      device="meta")
            weight = torch.randn(n_out, n_in, dtype=torch.bfloat16, device="cuda") * std
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=quant.double_quant,
                                             quant_type=quant.quant_type).to("cuda")  # quantized here
            layer.bias = torch.nn.Parameter(torch.zeros(n_out, dtype=torch.bfloat16, device="cuda"))
            setattr(parent, name, layer)
            del weight
    for module in model.modules():  # embeddings, norms: what is still on the meta device
        if any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
            module.to_empty(device="cuda", recurse=False)
            if isinstance(module, torch.nn.Embedding):
                torch.nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, torch.nn.LayerNorm):
                torch.nn.init.ones_(module.weight)
                torch.nn.init.zeros_(module.bias)
    model.lm_head.weight = model.transformer.wte.weight  # tied, as in GPT-2 (and ruGPT-3.5)
    model.is_loaded_in_4bit = True  # what transformers' bitsandbytes loader sets; peft picks its 4-bit LoRA layers
    model.loss_type = "ForCausalLM"
    return model


def qlora(cuda: bool, tiny: bool) -> dict[str, Any]:
    """A few QLoRA optimizer steps of the 13B shape on random tokens; peak memory next to the plan's estimate."""
    shape = QLORA_TINY if tiny else QLORA_13B
    with tempfile.TemporaryDirectory(prefix="impruver-gpu-check-") as tmp:
        plan = qlora_plan(Path(tmp), shape, cuda)
    estimate = plan.memory.model_dump() if plan.memory else None
    result: dict[str, Any] = {"arch": shape["arch"], "rows": f"{plan.train.batch_size} x {plan.seq_len}",
                              "plan_estimate_gib": estimate}
    if not cuda:
        return {**result, "skipped": NO_CUDA}
    if importlib.util.find_spec("bitsandbytes") is None:
        return {**result, "skipped": "bitsandbytes is not installed (pip install bitsandbytes)"}
    import torch

    from impruver import registry
    from impruver.components import method_of

    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = method_of(plan).apply(random_4bit_gpt2(plan), plan)
    build_s = time.perf_counter() - started
    weights_gib = torch.cuda.memory_allocated() / 1024**3
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = registry.lookup("optimizers", plan.train.optimizer)(params=trainable, lr=plan.train.lr)
    ids = torch.randint(0, plan.model.arch.vocab_size, (plan.train.batch_size, plan.seq_len), device="cuda")
    model.train()
    losses, times = [], []
    for _ in range(plan.train.max_steps):
        step_start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - step_start)
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated() / 1024**3
    total = estimate["total_gib"] if estimate else None
    return {**result, "build_s": round(build_s, 1), "weights_gib": round(weights_gib, 2),
            "trainable_params": sum(p.numel() for p in trainable), "losses": [round(x, 4) for x in losses],
            "finite": all(math.isfinite(x) for x in losses), "step_s": round(min(times[1:] or times), 3),
            "tokens_per_s": round(plan.train.batch_size * plan.seq_len / min(times[1:] or times)),
            "peak_memory_gib": round(peak, 2), "peak_over_estimate": round(peak / total, 2) if total else None}


def fsdp(cuda: bool, tiny: bool) -> dict[str, Any]:
    """`impruver preset=demo hardware=fsdp hardware.num_processes=1` through the command line."""
    if not cuda:
        return {"skipped": NO_CUDA}
    steps = 6 if tiny else 20
    with tempfile.TemporaryDirectory(prefix="impruver-gpu-check-") as tmp:
        out = Path(tmp) / "fsdp"
        cmd = [sys.executable, "-m", "impruver", "preset=demo", "hardware=fsdp", "hardware.num_processes=1",
               f"output_dir={out}", f"train.max_steps={steps}", f"train.save_steps={steps // 2}",
               f"train.eval_steps={steps // 2}"]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        wall = time.perf_counter() - started
        result: dict[str, Any] = {"command": " ".join(cmd[1:]), "rc": proc.returncode, "wall_s": round(wall, 1)}
        if proc.returncode != 0:
            return {**result, "error": (proc.stdout[-2000:] + proc.stderr[-2000:]).strip()}
        metrics = out / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        losses = [r["loss"] for r in records if r.get("event") == "train"]
        checkpoints = sorted(p.name for p in (out / "checkpoints").glob("*")) if (out / "checkpoints").is_dir() else []
        record = out / "run.json"  # the run's own record: world size, steps, tokens/s
        return {**result, "steps": len(losses), "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None, "checkpoints": checkpoints,
                "saved_model": (out / "model.safetensors").is_file() or any(out.glob("model-*.safetensors")),
                "run": json.loads(record.read_text()) if record.is_file() else None}


def run_one(name: str, tiny: bool) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    if name.startswith("throughput:"):
        return throughput(name.split(":", 1)[1], cuda)
    return {"qlora": qlora, "fsdp": fsdp}[name](cuda, tiny)


# -- the driver ------------------------------------------------------------------------------------------------


def run_section(name: str, tiny: bool, timeout: float) -> dict[str, Any]:
    """Run one section in a new process group; its JSON, or {"error": ...}. A timeout kills the whole group."""
    cmd = [sys.executable, __file__, "--section", name] + (["--tiny"] if tiny else [])
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the section and every process it started (sides, compile workers)
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": round(time.perf_counter() - started, 1)}
    wall = round(time.perf_counter() - started, 1)
    lines = stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit status {proc.returncode}: {(stderr or stdout)[-3000:].strip()}", "wall_s": wall}
    try:
        return {**json.loads(lines[-1]), "wall_s": wall}
    except ValueError:
        return {"error": f"no JSON result: {stdout[-2000:]}", "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the default without CUDA)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds all sections may take together")
    parser.add_argument("--section", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.section:
        try:
            result = run_one(args.section, args.tiny)
        except Exception as exc:  # reported in the JSON; the driver goes on with the next section
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result))
        return 0

    import torch
    import transformers

    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "CPU", "cuda": cuda, "tiny": tiny,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "bitsandbytes": _version("bitsandbytes"), "peft": _version("peft"),
                     "accelerate": _version("accelerate")},
        "budget_s": args.budget, "throughput": {}, "qlora": None, "fsdp": None,
    }
    for name, cap in SECTIONS_TINY if tiny else SECTIONS_GPU:
        left = args.budget - (time.perf_counter() - started)
        result = run_section(name, tiny, min(cap, left)) if left >= 20 else \
            {"error": f"not run: the {args.budget:.0f} s budget was spent"}
        if name.startswith("throughput:"):
            report["throughput"][name.split(":", 1)[1]] = result
        else:
            report[name] = result
        print(f"gpu_check: {name} done in {result.get('wall_s', 0)} s", file=sys.stderr, flush=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
