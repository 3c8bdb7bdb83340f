"""Benchmark impruver's training path against a plain ``transformers.Trainer`` with dynamic padding.

    HF_HUB_OFFLINE=1 python bench/train.py                       # CPU: a tiny GPT-2, about a minute
    HF_HUB_OFFLINE=1 python bench/train.py --shape gpt2-124m     # GPU: the shapes of shared/docs/gpu-facts.md
    HF_HUB_OFFLINE=1 python bench/train.py --shape rugpt3large
    HF_HUB_OFFLINE=1 python bench/train.py --shape mistral-7b-lora

A shape that would not fit the machine's memory (impruver.memory's estimate of each side against the free GPU
memory, or the available RAM on a CPU) is refused before anything is built, naming the rows that would fit
(exit status 2).

Both sides train the same model (random weights of the shape, same seed) on the same composed data: synthetic
chats with chat-like lengths (median ~300 tokens), composed once by ``impruver compose`` (loss on the assistant
turns only). Each side runs in its own process (so peak memory is its own):

* ``impruver``: ``impruver.train.recipe.run`` on the plan with impruver's default training settings, exactly as
  ``impruver train`` runs it: packed rows with per-sample position ids, sdpa, the output head on target tokens
  only, AdamW (fused on a GPU), and on a
  GPU bf16 autocast with fp32 master weights and ``torch.compile`` (``--no-compile`` to measure without);
* ``trainer``: ``transformers.Trainer`` with ``DataCollatorForSeq2Seq`` (dynamic padding to the batch's longest
  sample), its default optimizer, bf16 on a GPU; ``--trainer-collator flatten`` gives it its own padding-free
  packing (``DataCollatorWithFlattening``) and ``--trainer-compile`` its ``torch_compile`` (what
  ``bench/gpu_check.py`` runs, so that both sides pack and compile).

Printed as JSON: useful (non-padding) tokens/s, seconds per optimizer step, peak memory (CUDA allocator peak on a
GPU, process peak RSS on the CPU), MFU (6N + 12·L·d·T FLOPs per token, N without position embeddings, T the row
length, against the GPU's dense bf16 peak; null on the CPU), padding share, and ``ratio`` = impruver's useful
tokens/s divided by the Trainer's. The first ``--warmup`` steps of each side (compilation, allocator growth) are
not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
SHARED = ROOT.parent / "shared" / "data"

# name -> (arch, rows per impruver step x row length, Trainer batch, method, CPU-sized?)
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"arch": {"family": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 1024},
             "rows": 4, "seq_len": 1024, "trainer_batch": 12, "method": "scratch", "steps": 16},
    "gpt2-124m": {"arch": {"family": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024},
                  "rows": 32, "seq_len": 1024, "trainer_batch": 24, "method": "scratch", "steps": 40},
    "rugpt3large": {"arch": {"family": "gpt2", "n_layer": 24, "n_embd": 1536, "n_head": 16, "n_positions": 2048},
                    "rows": 8, "seq_len": 2048, "trainer_batch": 8, "method": "scratch", "steps": 30},
    "mistral-7b-lora": {"arch": {"family": "mistral", "n_layer": 32, "n_embd": 4096, "n_head": 32, "n_kv_head": 8,
                                 "n_inner": 14336, "n_positions": 4096, "tie_word_embeddings": False,
                                 "sliding_window": 4096},
                        "rows": 2, "seq_len": 2048, "trainer_batch": 4, "method": "lora", "steps": 20},
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12, "L4": 121e12}


# -- data ----------------------------------------------------------------------------------------------------


def synthetic_chats(path: Path, n: int, seed: int) -> Path:
    """Chats of pseudo-words whose token lengths look like chat data (log-normal, median ~300 tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ra", "ne", "to", "su", "vi", "da", "pe", "zo", "ri", "ma", "no", "te", "li"]
    words = ["".join(rng.choice(syllables, size=int(rng.integers(1, 4)))) for _ in range(3000)]
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            total = int(np.clip(rng.lognormal(np.log(230), 0.7), 20, 900))  # words; ~1.8 tokens each
            user = max(5, int(total * rng.uniform(0.15, 0.4)))
            text = rng.choice(words, size=total)
            messages = [{"role": "user", "content": " ".join(text[:user]) + "?"},
                        {"role": "assistant", "content": " ".join(text[user:]) + "."}]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


def gpt2_tokenizer_dir(folder: Path) -> Path | None:
    """GPT-2's real 50257-token BPE from ../shared/data, for the GPU shapes (None when the folder is absent)."""
    source = SHARED / "tokenizers" / "gpt2" / "tokenizer.json"
    if not source.is_file():
        return None
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(source), bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return folder


def make_plan(work: Path, args: argparse.Namespace, cuda: bool) -> Any:
    from impruver.plan import make_plan as _make_plan

    shape = SHAPES[args.shape]
    arch = dict(shape["arch"])
    tok_dir = None if args.shape == "tiny" else gpt2_tokenizer_dir(work / "gpt2-tokenizer")
    tokenizer = {"builder": "hf", "path": str(tok_dir), "chat_template": "saiga"} if tok_dir else \
        {"builder": "bpe", "vocab_size": 4096, "chat_template": "saiga",
         "special_tokens": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}}
    method: dict[str, Any] = {"builder": shape["method"]}
    if shape["method"] == "lora":
        method["lora"] = {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": "auto"}
    steps = args.steps or (shape["steps"] if cuda else 12)
    rows = args.rows or shape["rows"]
    config = {
        "output_dir": str(work / "impruver"), "seed": 0,
        "model": {"builder": "arch" if shape["method"] == "scratch" else "hf", "path": None, "arch": arch,
                  "weights": "random", "dtype": "bfloat16" if cuda and shape["method"] == "lora" else "auto",
                  "chat_template": "saiga", "context_length": shape["seq_len"], "attn_implementation": "sdpa"},
        "tokenizer": tokenizer,
        "dataset": {"sources": {"chats": {"path": str(work / "chats.jsonl"), "format": "openai"}},
                    "max_tokens": shape["seq_len"], "val_size": 0, "val_fraction": 0.0,
                    "dedup": {"exact": False, "near": False}},
        "method": method,
        "hardware": {"name": "bench", "device": "cuda" if cuda else "cpu",
                     "mixed_precision": "bf16" if cuda else "no", "gpu_memory_gib": 200.0 if cuda else None},
        "train": {"batch_size": rows, "max_steps": steps, "lr": 1e-4, "warmup_steps": 0,
                  "optimizer": "adamw", "compile": False if args.no_compile else "auto",
                  "packing": True, "eval_steps": None, "save_steps": None, "logging_steps": 1,
                  "load_best_at_end": False, "memory_check": False, "max_grad_norm": 1.0},
    }
    return _make_plan(config)


# -- one side per process ------------------------------------------------------------------------------------


def side_impruver(plan_path: str, warmup: int) -> dict[str, Any]:
    from impruver.plan import load_plan
    from impruver.train.recipe import run

    plan = load_plan(plan_path)
    _reset_peak()
    run(plan)
    records = [json.loads(line) for line in Path(plan.output_dir, "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("event") == "train"]
    first, last = train[warmup - 1], train[-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    steps = last["step"] - first["step"]
    tokens = last["tokens"] - first["tokens"]
    rows = plan.train.batch_size * plan.train.grad_accum
    return {"useful_tokens_per_s": tokens / seconds, "step_s": seconds / steps, "steps_timed": steps,
            "useful_tokens_per_step": tokens / steps, "computed_tokens_per_step": rows * plan.seq_len,
            "row_length": plan.seq_len, "peak_memory_gib": _peak_gib(), "final_loss": last["loss"]}


class _Counter:
    """Counts the useful tokens of each batch the Trainer's collator builds."""

    def __init__(self, collator: Any) -> None:
        self.collator, self.useful, self.computed, self.lengths = collator, [], [], []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        # A padded batch marks real tokens in attention_mask; a flattened one (1, total) has no padding at all.
        mask = batch.get("attention_mask")
        mask = mask if mask is not None else batch["input_ids"].new_ones(batch["input_ids"].shape)
        self.useful.append(int(mask.sum()))
        self.computed.append(int(mask.numel()))
        self.lengths.append(int(mask.shape[1]))
        return batch


def side_trainer(plan_path: str, warmup: int, batch: int, collator: str = "pad",
                 compile: bool = False) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainerCallback, \
        TrainingArguments

    from impruver import registry
    from impruver.data.pipeline import load_composed_tokenizer
    from impruver.plan import load_plan
    from impruver.components import method_of

    plan = load_plan(plan_path)
    cuda = plan.hardware.device == "cuda"
    tokenizer = load_composed_tokenizer(plan)
    torch.manual_seed(plan.train.seed)
    load = method_of(plan).load_options(plan)
    model = registry.lookup("models", plan.model.builder)(spec=plan.model, tokenizer=tokenizer, load=load)
    model = method_of(plan).apply(model, plan)
    model.config.use_cache = False
    model.loss_type = "ForCausalLM"
    data = load_dataset("json", data_files=plan.train_path, split="train")
    # pad: dynamic padding to the batch's longest sample; flatten: the Trainer's own padding-free packing (one row
    # of the batch's samples end to end, with per-sample position_ids that transformers masks across).
    base = DataCollatorWithFlattening(return_position_ids=True) if collator == "flatten" else \
        DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    counter = _Counter(base)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(Path(plan.output_dir).parent / "trainer"), per_device_train_batch_size=batch,
        max_steps=plan.train.max_steps, learning_rate=plan.train.lr, logging_steps=1, save_strategy="no",
        report_to=[], bf16=cuda, use_cpu=not cuda, dataloader_num_workers=0, seed=plan.train.seed,
        remove_unused_columns=False, disable_tqdm=True, max_grad_norm=1.0, torch_compile=compile,
    )
    _reset_peak()
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=counter,
                      processing_class=tokenizer, callbacks=[Clock()])
    result = trainer.train()
    timed = slice(warmup, len(times))
    seconds = times[-1] - times[warmup - 1]
    steps = len(times) - warmup
    useful = sum(counter.useful[timed])
    return {"useful_tokens_per_s": useful / seconds, "step_s": seconds / steps, "steps_timed": steps,
            "useful_tokens_per_step": useful / steps, "computed_tokens_per_step": sum(counter.computed[timed]) / steps,
            "row_length": sum(counter.lengths[timed]) / steps, "peak_memory_gib": _peak_gib(),
            "final_loss": result.training_loss}


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB, whole process


# -- the comparison ------------------------------------------------------------------------------------------


def mfu(result: dict[str, Any], plan: Any, peak: float | None) -> float | None:
    """Model FLOPs utilisation from useful tokens/s (6N + 12·L·d·T per token; T = the row length)."""
    if peak is None:
        return None
    from impruver.memory import shape_from_arch

    shape = shape_from_arch(plan.model.arch.model_copy(update={"vocab_size": result["vocab"]}))
    per_token = 6 * shape.n_params_non_embedding() + 12 * shape.n_layer * shape.d * result["row_length"]
    return result["useful_tokens_per_s"] * per_token / peak


def device_peak() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        import platform

        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", None
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return name, peak


# -- will it fit -------------------------------------------------------------------------------------------------


class TooBig(Exception):
    """The shape does not fit this machine's memory: refused before anything is built (exit status 2)."""


def available_gib(cuda: bool) -> tuple[float, str]:
    """Memory a side may use now, in GiB, and what it is: free GPU memory, or the RAM the kernel says is
    available (MemAvailable: free plus reclaimable caches)."""
    if cuda:
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free / 1024**3, f"free on {torch.cuda.get_device_name(0)}"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) / 1024**2, "RAM available"  # kB -> GiB
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages / 1024**3, "RAM free"


def check_fits(plan: Any, args: argparse.Namespace, cuda: bool) -> dict[str, float]:
    """Each side's estimated peak (impruver.memory, the estimate ``impruver plan`` prints) against what this
    machine has; TooBig, naming the rows that would fit, when either side would not fit.

    The Trainer's batch is estimated as that many rows of the full length (padding to the longest sample), an
    upper bound.
    """
    from impruver.memory import estimate

    shape = SHAPES[args.shape]
    trainer_batch = args.trainer_batch or shape["trainer_batch"]
    need = {"impruver": estimate(plan)["total"], "trainer": estimate(plan, batch_size=trainer_batch)["total"]}
    have, what = (args.memory_gib, "given by --memory-gib") if args.memory_gib else available_gib(cuda)
    if max(need.values()) <= have:
        return need
    rows = next((r for r in range(plan.train.batch_size, 0, -1) if estimate(plan, batch_size=r)["total"] <= have), 0)
    fix = (f"--rows {rows} --trainer-batch {rows}" if rows else "a smaller --shape (tiny is the CPU's default)")
    raise TooBig(f"--shape {args.shape} does not fit this machine: a side needs about {max(need.values()):.1f} GiB "
                 f"(impruver {need['impruver']:.1f} GiB at {plan.train.batch_size} rows x {plan.seq_len} tokens, "
                 f"Trainer {need['trainer']:.1f} GiB at batch {trainer_batch}; impruver.memory's estimate) and "
                 f"{have:.1f} GiB is {what}. Try {fix}" + ("" if cuda else ", or run it on a GPU") + ".")


def run_side(side: str, plan_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One side in its own process (its own peak memory); RuntimeError with its output when it fails."""
    cmd = [sys.executable, __file__, "--side", side, "--plan", str(plan_path), "--warmup", str(args.warmup),
           "--trainer-batch", str(args.trainer_batch or SHAPES[args.shape]["trainer_batch"]),
           "--trainer-collator", args.trainer_collator] + (["--trainer-compile"] if args.trainer_compile else [])
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{side} did not finish within {args.timeout} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"the {side} side failed ({_how(proc.returncode)}, after "
                           f"{time.perf_counter() - started:.0f} s): {_output(proc)}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def _how(code: int) -> str:
    """An exit status in words; a process the kernel killed for memory (SIGKILL) is named as such."""
    import signal

    if code >= 0:
        return f"exit status {code}"
    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
    likely = ": most likely out of memory (the kernel's OOM killer); try fewer --rows" if -code == 9 else ""
    return f"killed by {name}{likely}"


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    """The end of what a failed side printed, or a note that it printed nothing."""
    text = "\n".join(part.strip()[-4000:] for part in (proc.stdout, proc.stderr) if part.strip())
    return f"\n{text}" if text else "it printed nothing"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default=None, help="default: tiny on CPU, gpt2-124m on GPU")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="first steps not timed")
    parser.add_argument("--chats", type=int, default=None, help="synthetic chats to compose")
    parser.add_argument("--trainer-batch", type=int, default=None, help="Trainer rows per step (default: the shape's)")
    parser.add_argument("--trainer-collator", choices=["pad", "flatten"], default="pad",
                        help="Trainer batches: dynamic padding (default) or padding-free DataCollatorWithFlattening")
    parser.add_argument("--trainer-compile", action="store_true", help="TrainingArguments(torch_compile=True)")
    parser.add_argument("--rows", type=int, default=None, help="impruver packed rows per step (default: the shape's)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--timeout", type=float, default=None, help="seconds each side may take")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="memory a side may use (default: the free GPU memory, or the available RAM)")
    parser.add_argument("--side", choices=["impruver", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    return parser


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Compose synthetic chats once, train both sides on them, and return the side-by-side report."""
    import torch

    sys.path.insert(0, str(ROOT))
    cuda = torch.cuda.is_available()
    args.shape = args.shape or ("gpt2-124m" if cuda else "tiny")
    device, peak = device_peak()
    with tempfile.TemporaryDirectory(prefix="impruver-bench-") as tmp:
        work = Path(tmp)
        shape = SHAPES[args.shape]
        steps = args.steps or (shape["steps"] if cuda else 12)
        need_rows = (args.rows or shape["rows"]) * steps + 8
        chats = args.chats or max(300, int(need_rows * shape["seq_len"] / 300 * 1.2))
        plan = make_plan(work, args, cuda)
        check_fits(plan, args, cuda)  # before a minute of composing
        synthetic_chats(work / "chats.jsonl", chats, seed=0)
        from impruver.data.pipeline import ensure_composed, load_composed_tokenizer

        started = time.perf_counter()
        ensure_composed(plan)
        compose_s = time.perf_counter() - started
        plan.write()
        vocab = len(load_composed_tokenizer(plan))
        results = {side: run_side(side, Path(plan.output_dir) / "plan.yaml", args) for side in ("impruver", "trainer")}
    for result in results.values():
        result["vocab"] = vocab
        result["mfu"] = mfu(result, plan, peak)
        result["padding_share"] = 1 - result["useful_tokens_per_step"] / result["computed_tokens_per_step"]
        result.pop("vocab")
    collated = "DataCollatorWithFlattening (padding-free)" if args.trainer_collator == "flatten" else \
        "DataCollatorForSeq2Seq (dynamic padding)"
    return {
        "device": device, "shape": args.shape, "arch": shape["arch"], "method": shape["method"], "vocab": vocab,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "compose_s": round(compose_s, 1), "chats": chats,
        "impruver": {k: _round(v) for k, v in results["impruver"].items()},
        "trainer": {k: _round(v) for k, v in results["trainer"].items()},
        "ratio": round(results["impruver"]["useful_tokens_per_s"] / results["trainer"]["useful_tokens_per_s"], 2),
        "settings": {"impruver": f"packed {args.rows or shape['rows']} x {shape['seq_len']}, position ids, sdpa"
                     + (", bf16 autocast, fp32 master, fused AdamW" if cuda else ", fp32, AdamW")
                     + (", torch.compile" if cuda and not args.no_compile else ""),
                     "trainer": f"batch {args.trainer_batch or shape['trainer_batch']}, {collated}"
                                f"{', bf16' if cuda else ', fp32'}, default optimizer"
                                + (", torch_compile" if args.trainer_compile else "")},
    }


def main() -> None:
    args = parser().parse_args()
    sys.path.insert(0, str(ROOT))
    if args.side == "impruver":
        print(json.dumps(side_impruver(args.plan, args.warmup)))
        return
    if args.side == "trainer":
        print(json.dumps(side_trainer(args.plan, args.warmup, args.trainer_batch, args.trainer_collator,
                                      args.trainer_compile)))
        return
    try:
        report = compare(args)
    except TooBig as exc:
        print(f"bench/train.py: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as exc:
        print(f"bench/train.py: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(report, indent=1))


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


if __name__ == "__main__":
    main()
