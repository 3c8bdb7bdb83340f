"""Benchmark `impruver serve`: requests/s and tokens/s for 1, 8 and 32 concurrent clients (dynamic batching).

    HF_HUB_OFFLINE=1 python bench/serve.py                          # a tiny random GPT-2 built here (seconds)
    HF_HUB_OFFLINE=1 python bench/serve.py --output-dir outputs/demo  # what a run trained (after `impruver`)
    HF_HUB_OFFLINE=1 python bench/serve.py --clients 1,8,32,64 --requests 8 --max-tokens 64

The server is the real command, ``impruver serve`` in its own process, greedy (``chat.do_sample=false``); each
client is a thread that sends ``--requests`` non-streaming chat requests one after another (each asking for
``--max-tokens`` tokens) over its own keep-alive connection. Without ``--output-dir`` the model is a 2-layer
GPT-2 with random weights whose end-of-turn logit is pinned to 0, so every reply runs to ``--max-tokens`` and
the sides compare the same work.

Printed as JSON: for each client count, requests/s, completion tokens/s, mean and worst latency; and
``ratio_8_to_1`` = requests/s with 8 clients divided by requests/s with 1 (about 1 without batching, since one
model answers one request at a time; it grows with batching as long as the device is not saturated).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ("{% for m in messages %}{{ '<s>' + ('bot' if m['role'] == 'assistant' else m['role']) + '\\n' + "
            "m['content'] + '</s>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<s>bot\\n' }}{% endif %}")
CORPUS = ["Привет! Как дела? Hello, how are you today?",
          "Сайга — русскоязычный автоматический ассистент. It talks with people and helps them.",
          "The quick brown fox jumps over the lazy dog. Съешь же ещё этих мягких французских булок."]
QUESTIONS = ["Привет! Как дела?", "Hello, how are you today?", "Who are you?", "Сколько будет 2 + 3?"]


def build_tiny(folder: Path, *, width: int, layers: int, positions: int) -> Path:
    """A run folder as training leaves it: a random GPT-2, a BPE tokenizer with a chat template, plan.yaml."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from impruver.compose import compose
    from impruver.plan import make_plan

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=positions, n_embd=width, n_layer=layers,
                        n_head=max(1, width // 32), initializer_range=0.5, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight[tokenizer.eos_token_id].zero_()  # tied head: replies run to max_tokens
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    composed = compose(["preset=demo", f"output_dir={folder}"])
    make_plan(composed.config, choices=composed.choices).write(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(output_dir: Path, port: int, max_tokens: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("IMPRUVER_API_KEY", None)
    process = subprocess.Popen([sys.executable, "-m", "impruver", "serve", f"output_dir={output_dir}",
                                f"chat.port={port}", "chat.do_sample=false", f"chat.max_new_tokens={max_tokens}"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    for line in process.stdout:  # type: ignore[union-attr]
        seen.append(line)
        if "OpenAI-compatible API at" in line:
            threading.Thread(target=process.stdout.read, daemon=True).start()  # type: ignore[union-attr]
            return process
    process.wait()
    raise SystemExit(f"impruver serve did not start:\n{''.join(seen)}\n{process.stderr.read()}")  # type: ignore


def run_clients(port: int, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """``clients`` threads, each sending ``requests`` requests in turn; totals and latencies."""
    latencies: list[float] = []
    tokens: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        barrier.wait()
        for j in range(requests):
            body = json.dumps({"model": "bench", "max_tokens": max_tokens, "temperature": 0,
                               "messages": [{"role": "user", "content": QUESTIONS[(i + j) % len(QUESTIONS)]}]})
            started = time.perf_counter()
            connection.request("POST", "/v1/chat/completions", body=body,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read()
            with lock:
                if response.status != 200:
                    failures.append(f"{response.status} {data[:200]!r}")
                    continue
                latencies.append(time.perf_counter() - started)
                tokens.append(json.loads(data)["usage"]["completion_tokens"])
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} requests failed with {clients} clients: {failures[:3]}")
    return {"clients": clients, "requests": len(latencies), "seconds": round(elapsed, 6),  # rates derive from it
            "requests_per_s": round(len(latencies) / elapsed, 3),
            "tokens_per_s": round(sum(tokens) / elapsed, 1),
            "mean_latency_s": round(sum(latencies) / len(latencies), 4),
            "max_latency_s": round(max(latencies), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", type=Path, help="a run folder to serve (default: a tiny model built here)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent client counts, comma-separated")
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    parser.add_argument("--width", type=int, default=256, help="the tiny model's width (n_embd)")
    parser.add_argument("--layers", type=int, default=4, help="the tiny model's layers")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="impruver-bench-serve-") as tmp:
        folder = args.output_dir or build_tiny(Path(tmp) / "tiny", width=args.width, layers=args.layers,
                                               positions=512)
        port = free_port()
        process = start_server(folder, port, args.max_tokens)
        try:
            run_clients(port, 1, 1, args.max_tokens)  # warm-up: first-call allocations are not timed
            results = {str(c): run_clients(port, c, args.requests, args.max_tokens) for c in counts}
        finally:
            process.terminate()
            process.wait(timeout=60)
    rate = {c: r["requests_per_s"] for c, r in results.items()}
    report = {"model": str(args.output_dir) if args.output_dir else f"tiny gpt2 {args.layers}x{args.width}",
              "max_tokens": args.max_tokens, "requests_per_client": args.requests, "results": results,
              "ratio_8_to_1": round(rate["8"] / rate["1"], 2) if "8" in rate and "1" in rate else None}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
