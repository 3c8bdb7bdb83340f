"""Preference training wired end to end: the objective section of the plan, its memory estimate, pair compose on the
real LLaMA-Factory demos, every objective trained a few steps through the job graph, held-out accuracy and margin
rising under DPO, packed = unpacked for the recipe's loss, and resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from data_helpers import SHARED, needs_shared
from test_train_support import make_tokenizer

from impruver.errors import ConfigError
from impruver.plan import make_plan

GPT2 = {"family": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 1024}
PREFERENCE = SHARED / "preference"


def config(out: Path, objective: dict[str, Any], sources: dict[str, Any], *, tokenizer: dict[str, Any],
           data: Path | None = None, method: str = "full", arch: dict[str, Any] | None = None,
           train: dict[str, Any] | None = None, **dataset: Any) -> dict[str, Any]:
    """A plan's config: a tiny GPT-2 from scratch (``arch``) on the CPU, data composed into ``data``."""
    data = data or out / "data"
    return {
        "output_dir": str(out), "seed": 7, "train_path": str(data / "train.jsonl"), "val_path": str(data / "val.jsonl"),
        "model": {"builder": "arch", "arch": {**GPT2, **(arch or {})}, "dtype": "float32", "weights": "random"},
        "tokenizer": tokenizer,
        "dataset": {"sources": sources, "max_tokens": 1024, "num_proc": 1, **dataset},
        "method": {"builder": method, **({"lora": {"r": 4, "alpha": 8, "dropout": 0.0}} if method == "lora" else {})},
        "objective": objective,
        "hardware": {"name": "cpu", "device": "cpu"},
        "train": {"batch_size": 2, "lr": 1e-3, "max_steps": 2, "eval_steps": 100, "save_steps": 100,
                  "logging_steps": 1, "warmup_steps": 0, "seed": 7, **(train or {})},
    }


def small_bpe() -> dict[str, Any]:
    """A 512-token byte-level BPE trained on the composed data (a small head: the CPU's time goes to the steps)."""
    return {"builder": "bpe", "vocab_size": 512, "chat_template": "chatml"}


SHARED_SOURCES = {
    "dpo_en": {"path": str(PREFERENCE / "llamafactory_dpo_en_demo.json"), "format": "sharegpt_preference"},
    "v1": {"path": str(PREFERENCE / "llamafactory_v1_dpo_demo.jsonl"), "format": "openai_preference"},
}


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def metrics(out: Path, event: str) -> list[dict[str, Any]]:
    return [r for r in records(out / "metrics.jsonl") if r["event"] == event]


# -- the plan ----------------------------------------------------------------------------------------------------


def test_objective_options_are_checked_by_the_objective_with_the_valid_choices(tmp_path: Path) -> None:
    tok = {"builder": "bpe", "chat_template": "saiga"}
    with pytest.raises(ConfigError) as err:
        make_plan(config(tmp_path, {"name": "dpo", "bta": 0.1, "label_smoothing": 0.7}, SHARED_SOURCES,
                         tokenizer=tok))
    text = str(err.value)
    assert "objective.bta" in text and "did you mean 'beta'" in text
    assert "objective.label_smoothing" in text  # every problem at once
    with pytest.raises(ConfigError, match="unknown objective|no objective named 'dpoo'.*dpo"):
        make_plan(config(tmp_path, {"name": "dpoo"}, SHARED_SOURCES, tokenizer=tok))
    chats = {"c": {"path": "chats.jsonl", "format": "openai"}}
    with pytest.raises(ConfigError, match="dataset.sources.c.format: objective 'dpo' trains on pair records"):
        make_plan(config(tmp_path, {"name": "dpo"}, chats, tokenizer=tok))
    plan = make_plan(config(tmp_path, {"name": "orpo", "lambda": 0.2}, SHARED_SOURCES, tokenizer=tok))
    assert plan.objective.name == "orpo" and plan.objective.options == {"lambda": 0.2}
    sft = make_plan(config(tmp_path, {}, chats, tokenizer=tok))
    assert sft.objective.name == "sft"  # the default: SFT plans are unchanged


def _memory_text(plan: Any) -> str:
    from rich.console import Console

    from impruver.report import render_memory

    console = Console(record=True, width=200)
    console.print(render_memory(plan.memory, plan))
    return console.export_text()


def test_plan_memory_counts_the_reference_for_full_dpo_and_not_for_lora_dpo(tmp_path: Path) -> None:
    tok = {"builder": "bpe", "chat_template": "saiga"}
    arch = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}
    full = make_plan(config(tmp_path, {"name": "dpo"}, SHARED_SOURCES, tokenizer=tok, arch=arch))
    lora = make_plan(config(tmp_path, {"name": "dpo"}, SHARED_SOURCES, tokenizer=tok, arch=arch, method="lora"))
    pre = make_plan(config(tmp_path, {"name": "dpo", "reference": "precomputed"}, SHARED_SOURCES, tokenizer=tok,
                           arch=arch))
    orpo = make_plan(config(tmp_path, {"name": "orpo"}, SHARED_SOURCES, tokenizer=tok, arch=arch))
    from impruver.memory import plan_shape

    n_params = plan_shape(full).n_params()
    assert full.memory.reference_gib == pytest.approx(n_params * 4 / 1024**3, abs=0.01)  # one fp32 copy
    assert lora.memory.reference_gib == 0 and pre.memory.reference_gib == 0 and orpo.memory.reference_gib == 0
    assert "reference" in _memory_text(full) and "reference" not in _memory_text(lora)
    chats = {"c": {"path": "chats.jsonl", "format": "openai"}}
    sft = make_plan(config(tmp_path, {}, chats, tokenizer=tok, arch=arch))
    assert sft.memory.activations_gib < full.memory.activations_gib  # a pair: two sequences per sample


# -- compose and train -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two shared LLaMA-Factory demos composed once as pairs (a small BPE, ChatML, 1024 tokens)."""
    if not SHARED.is_dir():
        pytest.skip(f"real data folder {SHARED} is absent")
    from impruver.data.pipeline import run as compose

    data = tmp_path_factory.mktemp("pairs")
    plan = make_plan(config(data / "run", {"name": "dpo"}, SHARED_SOURCES, tokenizer=small_bpe(),
                            data=data / "data", val_size=4))
    compose(plan, inspect=1)
    return data / "data"


@needs_shared
def test_both_shared_files_compose_as_pairs_with_shared_prompts_and_counts(composed: Path) -> None:
    report = json.loads((composed / "compose_report.json").read_text(encoding="utf-8"))
    assert report["records"] == "pair"
    rows = report["sources"]
    assert rows["dpo_en"]["loaded"] == rows["dpo_en"]["converted"] == 300
    assert rows["v1"]["loaded"] == rows["v1"]["converted"] == 10
    for row in rows.values():  # every converted pair is kept, too long for 1024 tokens, or a duplicate
        assert row["converted"] == row["kept"] + row["too_long"] + row["duplicates"] + row["no_trainable"]
    train, val = records(composed / "train.jsonl"), records(composed / "val.jsonl")
    assert len(val) == 4 and len(train) + len(val) == sum(r["kept"] for r in rows.values())
    assert 30 < len(train) < 310
    for pair in train + val:
        n = pair["prompt_tokens"]
        assert pair["chosen"]["input_ids"][:n] == pair["rejected"]["input_ids"][:n]  # the same prompt tokens
        for side in ("chosen", "rejected"):
            labels = pair[side]["labels"]
            assert set(labels[:n]) == {-100} and any(x != -100 for x in labels[n:])  # only the answers train
            assert len(labels) <= 1024


@needs_shared
@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "simpo"])
def test_each_pair_objective_trains_on_the_composed_shared_pairs(composed: Path, tmp_path: Path,
                                                                 objective: str) -> None:
    from impruver.jobs import train_job

    out = tmp_path / objective
    plan = make_plan(config(out, {"name": objective}, SHARED_SOURCES, tokenizer=small_bpe(), data=composed,
                            val_size=4))
    summary = train_job(plan)  # the composed data is up to date: reused, not composed again
    assert summary["steps"] == 2 and summary["objective"] == objective
    logged = metrics(out, "train")
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
                "logps/rejected"):
        assert all(key in r and r[key] == r[key] for r in logged), key  # present and not NaN
    assert summary["heldout_accuracy_start"] is not None and summary["heldout_margin_end"] is not None
    assert (out / "model.safetensors").is_file()


@needs_shared
def test_kto_composes_the_pairs_as_labelled_answers_and_trains(tmp_path: Path) -> None:
    from impruver.jobs import train_job

    out = tmp_path / "kto"
    sources = {"v1": SHARED_SOURCES["v1"]}
    plan = make_plan(config(out, {"name": "kto"}, sources, tokenizer=small_bpe(), val_size=4))
    summary = train_job(plan)
    lines = records(Path(plan.train_path)) + records(Path(plan.val_path))
    report = json.loads((Path(plan.train_path).parent / "compose_report.json").read_text(encoding="utf-8"))
    assert report["records"] == "labelled" and report["sources"]["v1"]["converted"] == 20  # 10 pairs, unpaired
    assert len(lines) == report["sources"]["v1"]["kept"] and {r["label"] for r in lines} == {True, False}
    assert summary["steps"] == 2 and "kl" in metrics(out, "train")[-1]


# -- learning, packing, resume (a synthetic pair set a tiny model learns in a few dozen steps) ------------------


WORDS = "hello world how are you fine thank one two three four five six seven eight nine ten".split()


@pytest.fixture(scope="module")
def learnable(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """TRL pairs: a few words asked, "yes, <words>" chosen over "no, <words>" (unseen word pairs held out)."""
    folder = tmp_path_factory.mktemp("learnable")
    make_tokenizer(folder / "tok")
    lines = []
    for i, a in enumerate(WORDS):
        for b in WORDS[i + 1::3]:
            lines.append({"prompt": f"{a} {b}?", "chosen": f"yes, {a} {b}.", "rejected": f"no, {a} {b}."})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return {"folder": folder, "sources": {"pairs": {"path": str(folder / "pairs.jsonl"), "format": "trl_preference"}},
            "tokenizer": {"builder": "hf", "path": str(folder / "tok"), "chat_template": "saiga"}}


def learnable_plan(learnable: dict[str, Any], out: Path, train: dict[str, Any], **objective: Any) -> Any:
    return make_plan(config(out, {"name": "dpo", **objective}, learnable["sources"], tokenizer=learnable["tokenizer"],
                            data=learnable["folder"] / "data", arch={"n_positions": 128}, train=train, val_size=12))


def test_dpo_raises_heldout_accuracy_and_margin(learnable: dict[str, Any], tmp_path: Path) -> None:
    from impruver.jobs import train_job

    out = tmp_path / "dpo"
    train = {"max_steps": 16, "lr": 3e-3, "batch_size": 8, "eval_steps": 8, "logging_steps": 4}
    summary = train_job(learnable_plan(learnable, out, train, beta=0.5))
    assert summary["heldout_accuracy_end"] > summary["heldout_accuracy_start"]
    assert summary["heldout_margin_end"] > summary["heldout_margin_start"] + 0.1
    held = metrics(out, "eval_preference")
    assert [r["step"] for r in held] == [0, 8, 16]  # at the start, each evaluation, and the end
    summary_file = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert summary_file["heldout_accuracy_end"] == summary["heldout_accuracy_end"]


def test_recipe_loss_on_a_batch_is_the_same_packed_and_unpacked(learnable: dict[str, Any], tmp_path: Path) -> None:
    from impruver.jobs import prepare
    from impruver.train.pref_recipe import PreferenceRecipe

    plan = learnable_plan(learnable, tmp_path / "pack", {"batch_size": 6})
    prepare(plan)
    recipe = PreferenceRecipe(plan)
    recipe.setup()
    recipe.model.eval()
    packed = recipe.micro_batch(0)
    recipe.spec = recipe.spec.model_copy(update={"packing": False})
    padded = recipe.micro_batch(0)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # several sequences share a packed row
    with torch.no_grad():
        a, b = recipe.step_loss(packed), recipe.step_loss(padded)
    assert a.item() == pytest.approx(b.item(), abs=1e-5)


def test_resume_after_a_kill_ends_with_the_same_weights(learnable: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from impruver.jobs import prepare, train_job
    from impruver.train.pref_recipe import PreferenceRecipe

    class StopsAtStep(PreferenceRecipe):
        def step_loss(self, batch: Any) -> Any:
            if self.state.step + 1 == 7:
                raise KeyboardInterrupt
            return super().step_loss(batch)

    train = {"max_steps": 8, "save_steps": 4, "eval_steps": 4, "load_best_at_end": False}
    full, part = tmp_path / "full", tmp_path / "part"
    train_job(learnable_plan(learnable, full, train))
    plan = learnable_plan(learnable, part, train)
    prepare(plan)
    recipe = StopsAtStep(plan)
    recipe.setup()
    with pytest.raises(KeyboardInterrupt):
        recipe.train()
    summary = train_job(learnable_plan(learnable, part, {**train, "resume": "auto"}))
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    first = json.loads((full / "run.json").read_text(encoding="utf-8"))
    assert summary["heldout_accuracy_start"] == first["heldout_accuracy_start"]  # read back after the resume


def test_every_objective_option_plans_with_a_preference_dataset() -> None:
    from impruver.compose import compose, list_options

    options = list_options("objective")
    assert set(options) >= {"sft", "dpo", "ipo", "orpo", "simpo", "kto"}
    for option in options:
        if option == "sft":
            continue
        composed = compose([f"objective={option}", "dataset=demo_preference"])
        plan = make_plan(composed.config, choices=composed.choices)
        assert plan.objective.name == option and plan.output_dir.endswith(f"-{option}")
