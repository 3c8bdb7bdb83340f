"""Benchmark DPO with LoRA: impruver's preference recipe next to ``trl.DPOTrainer`` on the same pairs and model.

    HF_HUB_OFFLINE=1 python bench/preference.py                       # CPU: a tiny GPT-2 (4 x 256), ~2 minutes
    HF_HUB_OFFLINE=1 python bench/preference.py --shape 760m --steps 30 --batch 8   # on a GPU: ruGPT-3 Large's shape
    HF_HUB_OFFLINE=1 python bench/preference.py --data ../shared/data/preference/llamafactory_dpo_en_demo.json \
        --format sharegpt_preference --vocab 8192        # long answers of mixed lengths: where padding costs

Both sides train the same model (a GPT-2 with random weights built and saved here, with a byte-level BPE trained on
the pairs and a chat template), with the same LoRA (r 16 on c_attn, c_proj, c_fc), the same DPO loss (beta 0.1,
sigmoid), learning rate and batch size (pairs per step), on the demo's preference pairs
(``impruver/assets/demo/preferences.jsonl``, TRL's conversational prompt / chosen / rejected format) or ``--data``
in any of impruver's preference formats (converted to TRL's format for TRL). Each runs in its own process, so that
its memory is its own. The reference is the model with the adapter disabled on both sides, and both train with the
model's dropout off (TRL's ``disable_dropout``, impruver's preference recipe).

Same work on both sides: the first ``steps x batch`` distinct pairs whose both conversations fit 1,024 tokens are
kept, so neither side drops, deduplicates or truncates any (compose's report is checked), and each side trains
exactly one epoch over them (``steps`` optimizer steps), each in its own shuffled order. Useful tokens are counted
from the batches each side actually consumed (impruver's collate, TRL's collator): prompt + chosen and prompt +
rejected per pair, no padding. Both sides' per-pair counts are printed, sorted, and must agree (exit 1 otherwise):
the two tokenizations (impruver's renderer, TRL's ``apply_chat_template``) give the same tokens.

What differs is how the work is done. impruver packs both answers of every pair of a step into rows as wide as the
step's longest sequence (each scored as its own sequence, no attention across them), runs the output head over
chunks of answer tokens only (with the head frozen, each token's gradient is worked out in the same pass: no
[tokens x vocabulary] logits kept for the backward pass), uses a fused kernel for GPT-2's GELU, and gets the
reference from the same packed rows with the adapter disabled under no_grad. TRL 1.16 pads chosen and rejected
answers to the batch's longest ([2 x batch, longest]) and runs its tiled ``fused_lm_head`` on answer tokens.

Printed as JSON, for each tool: useful tokens per second (divided by the training loop's wall time), the pairs
consumed, memory held when its training loop started, the loop's peak (GPU: ``max_memory_allocated``; CPU: the peak
RSS, reset when the loop starts), the growth between the two, the whole process's peak RSS (loading and saving
included) and the last loss; then ``same_pairs_and_tokens``, ``tokens_per_pair``, ``ratio`` = impruver's tokens/s
over TRL's, ``memory_ratio`` = impruver's loop peak over TRL's and ``growth_ratio``.

Measured on the CPU (2 cores shared with other work, load average 6 to 7; each command twice), impruver / TRL:

    --data llamafactory_dpo_en_demo.json --format sharegpt_preference --vocab 8192 --steps 6 --batch 8
        48 pairs, 39,631 useful tokens on both sides (178 to 1,815 per pair)
        568 / 177 tok/s = 3.20x, loop peak RSS 1,890 / 2,491 MiB = 0.76x
        545 / 178 tok/s = 3.06x, loop peak RSS 1,961 / 2,199 MiB = 0.89x
    (defaults: the demo's pairs, --steps 20 --batch 8)
        160 pairs, 8,030 useful tokens on both sides (about 50 per pair: short chats, nothing to unpad)
        167 / 175 tok/s = 0.96x, loop peak RSS 536 / 614 MiB = 0.87x
        237 / 197 tok/s = 1.20x, loop peak RSS 534 / 606 MiB = 0.88x
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
PAIRS = ROOT / "impruver" / "assets" / "demo" / "preferences.jsonl"
TEMPLATE = ("{% for m in messages %}{{ '<s>' + ('bot' if m['role'] == 'assistant' else m['role']) + '\\n' + "
            "m['content'] + '</s>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<s>bot\\n' }}{% endif %}")
SHAPES = {  # GPT-2 shapes: a tiny one for the CPU, ruGPT-3 Large's for a GPU
    "tiny": {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 1024},
    "760m": {"n_layer": 24, "n_embd": 1536, "n_head": 16, "n_positions": 2048},
}
LORA = {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": ["c_attn", "c_proj", "c_fc"]}
SEQ_LEN = 1024  # tokens per row (impruver) and max_length (TRL)


def read_pairs(path: Path, fmt: str) -> list[dict[str, Any]]:
    """TRL conversational pairs from a file in any of impruver's preference formats (converted by impruver's format;
    records it cannot use are left out, as compose would count them)."""
    from impruver import registry
    from impruver.data.messages import RecordError, SkipRecord

    text = path.read_text(encoding="utf-8")
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    func, pairs = registry.lookup("formats", fmt), []
    for row in rows:
        try:
            pairs += [{k: [{"role": m["role"], "content": m["content"]} for m in p[k]]
                       for k in ("prompt", "chosen", "rejected")} for p in func(row)]
        except (RecordError, SkipRecord):
            continue
    return pairs


def prepare(work: Path, shape: str, data: Path, fmt: str, vocab: int, n_pairs: int) -> None:
    """The pairs as TRL conversational records, a BPE trained on them with the chat template, and a random GPT-2.

    Only ``n_pairs`` pairs are kept: the first distinct ones whose both conversations fit SEQ_LEN. Each side then
    trains exactly one epoch over them, so both consume the same pairs (in their own shuffled orders) and neither
    drops, deduplicates or truncates any (compose's report is checked for that in :func:`main`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    pairs = read_pairs(data, fmt)
    texts = [m["content"] for p in pairs for k in ("prompt", "chosen", "rejected") for m in p[k]]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts * 4, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = TEMPLATE

    def length(messages: list[dict[str, str]]) -> int:  # transformers 5 returns a BatchEncoding unless told not to
        return len(tok.apply_chat_template(messages, tokenize=True, return_dict=False))

    seen: set[str] = set()
    fits = []
    for p in pairs:
        key = json.dumps(p, sort_keys=True, ensure_ascii=False)
        if key in seen or max(length(p["prompt"] + p[k]) for k in ("chosen", "rejected")) > SEQ_LEN:
            continue
        seen.add(key)
        fits.append(p)
    if len(fits) < n_pairs:
        raise SystemExit(f"{data}: {len(fits)} distinct pairs fit {SEQ_LEN} tokens, fewer than steps x batch = "
                         f"{n_pairs}; lower --steps or --batch")
    (work / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in fits[:n_pairs]),
                                      encoding="utf-8")
    config = GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, n_ctx=SHAPES[shape]["n_positions"], **SHAPES[shape])
    import torch

    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(work / "model")
    tok.save_pretrained(work / "model")


def peak_memory_mib() -> float:
    """The process's peak: GPU ``max_memory_allocated``, else the peak RSS (VmHWM) since :func:`reset_peak`."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_kib("VmHWM") / 1024


def rss_mib() -> float:
    """The memory held now: GPU ``memory_allocated``, else the current RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    return _status_kib("VmRSS") / 1024


def reset_peak() -> None:
    """Start a new peak here (Linux: writing 5 to clear_refs resets VmHWM to the current RSS), so the training
    loop's peak is measured without what loading, tokenizing or saving held before or after it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")


def _status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def memory(before_mib: float) -> dict[str, float]:
    """Memory figures of a side: held when its training loop started, the loop's peak, the growth between them
    and the whole process's peak (loading and saving included)."""
    peak = peak_memory_mib()
    return {"memory_at_start_mib": before_mib, "peak_memory_mib": peak, "growth_mib": peak - before_mib,
            "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def impruver_plan(work: Path, steps: int, batch: int, lr: float) -> Any:
    import torch

    from impruver.plan import make_plan

    gpu = torch.cuda.is_available()
    return make_plan({
        "output_dir": str(work / "impruver"), "seed": 0,
        "model": {"builder": "hf", "path": str(work / "model"), "dtype": "bfloat16" if gpu else "float32"},
        "tokenizer": {"builder": "hf", "path": str(work / "model")},
        "dataset": {"sources": {"pairs": {"path": str(work / "pairs.jsonl"), "format": "trl_preference"}},
                    "max_tokens": SEQ_LEN, "val_size": 0, "num_proc": 1, "dedup": {"near": False}},
        "method": {"builder": "lora", "lora": LORA},
        "objective": {"name": "dpo", "beta": 0.1},
        "hardware": {"name": "gpu" if gpu else "cpu", "device": "cuda" if gpu else "cpu",
                     "mixed_precision": "bf16" if gpu else "no"},
        "train": {"max_steps": steps, "batch_size": batch, "lr": lr, "warmup_steps": 0, "logging_steps": steps,
                  "eval_steps": None, "save_steps": None, "max_seq_len": SEQ_LEN, "packing": True, "seed": 0,
                  "compile": False, "memory_check": False},
    })


def run_impruver(work: Path, steps: int, batch: int, lr: float) -> dict[str, Any]:
    from impruver.jobs import train_job
    from impruver.train.pref_recipe import PreferenceRecipe

    consumed: list[int] = []  # useful tokens of each pair the loop trained on, in its order
    marks: dict[str, Any] = {}
    collate, train = PreferenceRecipe._collate, PreferenceRecipe.train

    def counting_collate(self: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
        consumed.extend(len(r["chosen"]["input_ids"]) + len(r["rejected"]["input_ids"]) for r in records)
        return collate(self, records)

    def measured_train(self: Any) -> None:
        before = rss_mib()
        reset_peak()
        train(self)
        marks.update(memory(before))

    PreferenceRecipe._collate, PreferenceRecipe.train = counting_collate, measured_train
    summary = train_job(impruver_plan(work, steps, batch, lr))  # the data was composed by the parent process
    records = [json.loads(line) for line in (work / "impruver" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("event") == "train"][-1]
    assert summary["tokens"] == sum(consumed), (summary["tokens"], sum(consumed))
    return {"tokens_per_s": summary["tokens"] / summary["elapsed_s"], "tokens": summary["tokens"],
            "pairs": len(consumed), "seconds": summary["elapsed_s"], **marks, "last_loss": last["loss"],
            "tokens_per_pair": sorted(consumed)}


def run_trl(work: Path, steps: int, batch: int, lr: float) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    gpu = torch.cuda.is_available()
    records = [json.loads(line) for line in (work / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16 if gpu else torch.float32)
    args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=batch, max_steps=steps,
                     learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0, beta=0.1, max_length=SEQ_LEN,
                     logging_steps=steps, save_strategy="no", report_to=[], seed=0, use_cpu=not gpu, bf16=gpu,
                     dataloader_num_workers=0, remove_unused_columns=False)
    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tok,
                         peft_config=peft)
    # Useful tokens of a pair as impruver counts them: prompt + chosen and prompt + rejected (no padding), counted
    # from the examples TRL's collator was handed, i.e. the pairs it really trained on.
    consumed: list[int] = []
    collator = trainer.data_collator

    def counting_collator(examples: list[dict[str, Any]]) -> Any:
        consumed.extend(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
        return collator(examples)

    trainer.data_collator = counting_collator
    before = rss_mib()
    reset_peak()
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    marks = memory(before)
    tokens = sum(consumed)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "pairs": len(consumed), "seconds": round(seconds, 3),
            **marks, "last_loss": output.training_loss, "tokens_per_pair": sorted(consumed)}


def child(tool: str, work: Path, steps: int, batch: int, lr: float) -> dict[str, Any]:
    command = [sys.executable, __file__, "--run", tool, "--work", str(work), "--steps", str(steps), "--batch",
               str(batch), "--lr", str(lr)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per tool")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--data", type=Path, default=PAIRS, help="preference pairs (default: the demo's)")
    parser.add_argument("--format", default="trl_preference", help="their impruver format (default: trl_preference)")
    parser.add_argument("--vocab", type=int, default=2048, help="the BPE's vocabulary (the output head's width)")
    parser.add_argument("--run", choices=["impruver", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:  # one side, in its own process
        runner = run_impruver if args.run == "impruver" else run_trl
        print(json.dumps(runner(args.work, args.steps, args.batch, args.lr)))
        return 0
    with tempfile.TemporaryDirectory(prefix="impruver-bench-pref-") as tmp:
        work = Path(tmp)
        prepare(work, args.shape, args.data, args.format, args.vocab, args.steps * args.batch)
        from impruver.data.pipeline import ensure_composed

        # Composed here, not timed and not in the child's memory (TRL tokenizes in its constructor, not timed).
        report = ensure_composed(impruver_plan(work, args.steps, args.batch, args.lr)).report
        counts = report["sources"]["pairs"]
        if counts["kept"] != args.steps * args.batch:
            raise SystemExit(f"compose kept {counts['kept']} of {args.steps * args.batch} pairs (too long "
                             f"{counts['too_long']}, duplicates {counts['duplicates']}): the two sides would not "
                             "train on the same pairs")
        results = {tool: child(tool, work, args.steps, args.batch, args.lr) for tool in ("impruver", "trl")}
    import torch

    per_pair = {tool: r.pop("tokens_per_pair") for tool, r in results.items()}
    same = per_pair["impruver"] == per_pair["trl"]
    out = {"data": str(args.data), "pairs": counts["kept"], "vocab": args.vocab, "shape": args.shape,
           "device": "cuda" if torch.cuda.is_available() else "cpu", "steps": args.steps, "pairs_per_step": args.batch,
           **{k: {m: round(v, 3) if isinstance(v, float) else v for m, v in r.items()} for k, r in results.items()},
           # Both sides' useful tokens of every pair they trained on, sorted (the orders differ: each shuffles).
           "same_pairs_and_tokens": same,
           "tokens_per_pair": ({"both": per_pair["impruver"]} if same else per_pair),
           "ratio": round(results["impruver"]["tokens_per_s"] / results["trl"]["tokens_per_s"], 2),
           "memory_ratio": round(results["impruver"]["peak_memory_mib"] / results["trl"]["peak_memory_mib"], 2),
           "growth_ratio": round(results["impruver"]["growth_mib"] / max(results["trl"]["growth_mib"], 1e-9), 2)}
    text = json.dumps(out, indent=1)
    for key in ("both", "impruver", "trl"):  # the lists on one line each
        if key in out["tokens_per_pair"]:
            text = text.replace(json.dumps(out["tokens_per_pair"][key], indent=1).replace("\n", "\n  "),
                                json.dumps(out["tokens_per_pair"][key]))
    print(text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
