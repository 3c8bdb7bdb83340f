"""Benchmark DPO with LoRA: impruver's preference recipe next to ``trl.DPOTrainer`` on the same pairs and model.

    HF_HUB_OFFLINE=1 python bench/preference.py                       # CPU: a tiny GPT-2 (4 x 256), ~a minute
    HF_HUB_OFFLINE=1 python bench/preference.py --shape 760m --steps 30 --batch 8   # on a GPU: ruGPT-3 Large's shape
    HF_HUB_OFFLINE=1 python bench/preference.py --data ../shared/data/preference/llamafactory_dpo_en_demo.json \
        --format sharegpt_preference --vocab 8192        # long answers of mixed lengths: where padding costs

Both sides train the same model (a GPT-2 with random weights built and saved here, with a byte-level BPE trained on
the pairs and a chat template), with the same LoRA (r 16 on c_attn, c_proj, c_fc), the same DPO loss (beta 0.1,
sigmoid), learning rate, batch size (pairs per step) and number of steps, on the demo's preference pairs
(``impruver/assets/demo/preferences.jsonl``, TRL's conversational prompt / chosen / rejected format). Each runs in
its own process so that its peak memory is its own. The reference is the model with the adapter disabled on both
sides. ``--data`` / ``--format`` take any file impruver reads as pairs (converted to TRL's format for TRL).

What differs is how the work is done: impruver packs both answers of every pair of a step into ``seq_len``-token
rows (each scored as its own sequence), runs the output head on answer tokens only, and gets the reference from the
same packed rows with the adapter disabled; TRL pads chosen and rejected answers to the batch's longest and
computes full logits.

Printed as JSON: for each tool, useful tokens per second (the real tokens of the pairs processed, prompt counted once
per answer, no padding, divided by the training loop's wall time), peak memory (GPU: ``max_memory_allocated``;
CPU: the process's peak RSS) and the last loss; and ``ratio`` = impruver's tokens/s over TRL's,
``memory_ratio`` = impruver's peak over TRL's.
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


def prepare(work: Path, shape: str, data: Path, fmt: str, vocab: int) -> None:
    """The pairs as TRL conversational records, a BPE trained on them with the chat template, and a random GPT-2."""
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
    # Only pairs whose both conversations fit SEQ_LEN (with room for the template's edges): both tools then train
    # on the same whole pairs, neither drops nor truncates any.
    fits = [p for p in pairs if max(len(tok.apply_chat_template(p["prompt"] + p[k], tokenize=True))
                                    for k in ("chosen", "rejected")) <= SEQ_LEN - 8]
    (work / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in fits),
                                      encoding="utf-8")
    config = GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, n_ctx=SHAPES[shape]["n_positions"], **SHAPES[shape])
    import torch

    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(work / "model")
    tok.save_pretrained(work / "model")


def peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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

    summary = train_job(impruver_plan(work, steps, batch, lr))  # the data was composed by the parent process
    records = [json.loads(line) for line in (work / "impruver" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("event") == "train"][-1]
    return {"tokens_per_s": summary["tokens"] / summary["elapsed_s"], "tokens": summary["tokens"],
            "seconds": summary["elapsed_s"], "peak_memory_mib": peak_memory_mib(), "last_loss": last["loss"]}


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
    data = trainer.train_dataset
    # Useful tokens of a pair: prompt + chosen and prompt + rejected, as impruver counts them (no padding).
    per_pair = [2 * len(p) + len(c) + len(r)
                for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])]
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    tokens = sum(per_pair) / len(per_pair) * steps * batch
    return {"tokens_per_s": tokens / seconds, "tokens": round(tokens), "seconds": round(seconds, 3),
            "peak_memory_mib": peak_memory_mib(), "last_loss": output.training_loss}


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
        prepare(work, args.shape, args.data, args.format, args.vocab)
        from impruver.data.pipeline import ensure_composed

        # Composed here, not timed and not in the child's memory (TRL tokenizes in its constructor, not timed).
        pairs = ensure_composed(impruver_plan(work, args.steps, args.batch, args.lr)).report["train"]["samples"]
        results = {tool: child(tool, work, args.steps, args.batch, args.lr) for tool in ("impruver", "trl")}
    import torch

    report = {"data": str(args.data), "pairs": pairs, "vocab": args.vocab, "shape": args.shape, "device": "cuda" if torch.cuda.is_available() else "cpu", "steps": args.steps,
              "pairs_per_step": args.batch, **{k: {m: round(v, 3) if isinstance(v, float) else v for m, v in r.items()}
                                               for k, r in results.items()},
              "ratio": round(results["impruver"]["tokens_per_s"] / results["trl"]["tokens_per_s"], 2),
              "memory_ratio": round(results["impruver"]["peak_memory_mib"] / results["trl"]["peak_memory_mib"], 2)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
