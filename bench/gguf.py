"""GGUF export time and peak host memory: the demo's model, and random weights of the 760M preset's shape.

    HF_HUB_OFFLINE=1 python bench/gguf.py [--demo OUTPUT_DIR] [--shared ../shared/data] [--work DIR] [--skip-large]

Steps (each in a fresh process, so each peak RSS is its own; ``imports`` is the floor every step pays):

* ``imports``: python + torch + transformers + gguf imported, nothing else;
* ``build``: the model folder (760M: ``rugpt3large``'s arch, GPT-2 24 x 1536, random init, saved in bf16 with
  GPT-2's 50,257-token BPE and the saiga template; demo: the given run's output, or the demo's 4 x 128 shape);
* ``f16`` / ``bf16``: impruver's writer, tensor by tensor;
* ``q8_0``: llama.cpp's quantizer from the bf16 (760M) or f16 (demo) file.

Printed as JSON: per model, ``weights_mb`` (safetensors on disk) and per step ``seconds``, ``peak_rss_mb``,
``file_mb``. The issue's bound: quantizing needs at most the bf16 weights plus one layer of host memory; the
writer's peak above ``imports`` is about the largest tensor (GPT-2's 50,257 x 1536 embedding: 147 MB in f16
plus its f32 or bf16 source).

Measured 2026-12-02 on the shared 2-core machine (load 12-14 from other jobs, so seconds are pessimistic), with
``HF_HUB_OFFLINE=1 python bench/gguf.py --shared /work/shared/data`` (the 760M f16 / bf16 / q8_0 rows re-run
with ``--step`` after safetensors files were opened per tensor; before that, one memory map for the whole file
put every page read in the resident set: 1927 MB peak for f16):

| model | weights on disk | step | seconds | peak RSS | file |
|---|---|---|---|---|---|
| both | | imports only | | 243 MB | |
| the demo's output (`impruver train.max_steps=20`, 4 x 128, its 4k BPE; `--demo`) | 4.1 MB | f16 | 2.3 | 275 MB | 2.1 MB |
| | | q8_0 (llama.cpp, from f16) | 0.7 | 261 MB | 1.2 MB |
| demo shape (4 x 128, GPT-2's 50k vocabulary: 7M params, f32) | 28 MB | f16 | 3.6 | 371 MB | 16 MB |
| | | q8_0 (llama.cpp, from f16) | 1.1 | 313 MB | 9 MB |
| rugpt3large shape (760M, random, bf16) | 1450 MB | build (random init + save) | 327 | 1988 MB | |
| | | f16 | 18.8 | 666 MB | 1453 MB |
| | | bf16 | 12.1 | 491 MB | 1453 MB |
| | | q8_0 (llama.cpp, from bf16) | 12.4 | 789 MB | 776 MB |

Writing adds 250-420 MB to the imports for the 760M model: its largest tensor (the 50,257 x 1536 embedding, 147 MB
in bf16) converted to f16, plus the vocabulary; about a third of its bf16 weights, and independent of the number
of layers. llama.cpp's quantizer stays below the bf16 weights (789 MB vs 1450 MB: its memory map of the source
counts as resident while it reads). For a 13B model the same shape of figures means about one embedding (0.5 GB
in bf16) above the imports, far below "the bf16 weights plus one layer".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path, and this file is named like llama.cpp's `gguf`
# package: drop the folder so that `import gguf` finds the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
LARGE = {"n_layer": 24, "n_embd": 1536, "n_head": 16, "n_positions": 2048}  # conf/model/rugpt3large.yaml
DEMO = {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": 256}  # conf/model/demo.yaml over tiny.yaml


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _step(step: str, folder: Path, out: Path, shared: Path, shape: str) -> dict[str, float]:
    """One step in this process; returns its figures."""
    import gguf  # noqa: F401
    import torch
    import transformers  # noqa: F401

    started = time.perf_counter()
    record: dict[str, float] = {}
    if step == "build":
        from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

        from impruver.data.templates import SAIGA

        tok = PreTrainedTokenizerFast(tokenizer_file=str(shared / "tokenizers/gpt2/tokenizer.json"),
                                      bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>")
        tok.chat_template = SAIGA
        arch = LARGE if shape == "large" else DEMO
        config = AutoConfig.for_model("gpt2", vocab_size=len(tok), **arch)
        torch.manual_seed(0)
        dtype = torch.bfloat16 if shape == "large" else torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    elif step in ("f16", "bf16"):
        from transformers import AutoTokenizer

        from impruver.gguf.write import source_of, write_float_gguf

        path = out / f"bench-{step}.gguf"
        write_float_gguf(source_of(folder), path, ftype=step, tokenizer=AutoTokenizer.from_pretrained(folder),
                         name="bench", chat_template=None, eot_id=None)
        record["file_mb"] = path.stat().st_size / 2**20
    elif step == "q8_0":
        from impruver.gguf.quantize import quantize
        from impruver.gguf.write import source_of

        base = out / f"bench-{source_of(folder).weights_dtype}.gguf"
        path = quantize(base, out / "bench-q8_0.gguf", "q8_0")
        record["file_mb"] = path.stat().st_size / 2**20
    record["seconds"] = round(time.perf_counter() - started, 2)
    record["peak_rss_mb"] = round(_peak_mb(), 1)
    return record


def _in_child(step: str, folder: Path, out: Path, shared: Path, shape: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, "--step", step, "--folder", str(folder), "--out", str(out),
                           "--shared", str(shared), "--shape", shape], text=True, capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _bench(name: str, folder: Path, work: Path, shared: Path, shape: str, *, build: bool) -> dict[str, object]:
    out = work / f"{name}-gguf"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    steps: dict[str, object] = {"imports": _in_child("imports", folder, out, shared, shape)}
    if build:
        shutil.rmtree(folder, ignore_errors=True)
        steps["build"] = _in_child("build", folder, out, shared, shape)
    base = "bf16" if shape == "large" else "f16"
    for step in dict.fromkeys(["f16", base, "q8_0"]):
        steps[step] = _in_child(step, folder, out, shared, shape)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
    return {"weights_mb": round(weights, 1), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, help="a demo run's output_dir (default: a random model of its shape)")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "impruver-bench-gguf")
    parser.add_argument("--skip-large", action="store_true", help="only the demo")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="demo", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(_step(args.step, args.folder, args.out, args.shared, args.shape)))
        return
    figures = {}
    demo = args.demo or args.work / "demo-model"
    figures["demo"] = _bench("demo", demo, args.work, args.shared, "demo", build=args.demo is None)
    if not args.skip_large:
        figures["rugpt3large_760m_random"] = _bench("large", args.work / "large-model", args.work, args.shared,
                                                    "large", build=True)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
