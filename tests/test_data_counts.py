"""Counts for everything: near-duplicates confirmed by their exact Jaccard, truncation and dropped reasoning
reported, add_bos / add_eos never doubled and checked before any record is read."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from data_helpers import SHARED, needs_shared, qwen3_tokenizer
from impruver.data import convert, dedup
from impruver.data.render import SourceOptions


def test_an_estimate_alone_never_drops_a_record():
    """Two rows whose signatures agree completely (estimate 1.0) but whose shingle sets share 1 of 4."""
    texts = ["a b c d e f", "a b c d e g h"]
    shingled = dedup.shingle_sets(texts, shingle_size=5)
    offsets = np.r_[0, np.cumsum(shingled[1])]
    sigs = np.zeros((2, 16), dtype=np.uint32)  # identical: any estimate says "duplicate"
    bands = dedup.band_keys_of(sigs, 4, 4)
    both = np.ones(2, dtype=bool)
    assert dedup.near_duplicates(bands, sigs, both, 0.85).tolist() == [False, True]  # the estimate alone
    rejected: list[int] = []
    assert dedup.near_duplicates(bands, sigs, both, 0.85, (shingled[0], offsets), rejected).tolist() == [False, False]
    assert rejected == [1]
    assert dedup.jaccard(*(shingled[0][offsets[k]:offsets[k + 1]] for k in (0, 1))) == 1 / 4
    same = dedup.shingle_sets(["a b c d e f", "A  b c d e, f"], shingle_size=5)  # a true duplicate stays one
    assert dedup.near_duplicates(bands, sigs, both, 0.85, (same[0], np.r_[0, np.cumsum(same[1])])).tolist() == \
        [False, True]


@needs_shared
def test_fastchat_near_duplicates_are_true_ones():
    """The 500 FastChat conversations: every dropped one has an exact Jaccard >= 0.85 with an earlier one (the
    estimate alone dropped conversations at 0.80-0.83)."""
    from impruver.data import formats as F

    records = json.loads((SHARED / "sharegpt/fastchat_dummy_conversation.json").read_text())
    texts = [convert._dedup_text(c) for r in records for c in F.sharegpt(r)]
    exact = np.array([dedup.exact_key(t) for t in texts], dtype=np.uint64)
    candidates = ~dedup.first_occurrences(exact, np.ones(len(texts), dtype=bool))
    sigs = dedup.signatures(texts, num_perm=128, shingle_size=5)
    bands = dedup.band_keys_of(sigs, *dedup.lsh_params(0.85, 128))
    values, counts = dedup.shingle_sets(texts, shingle_size=5)
    offsets = np.r_[0, np.cumsum(counts)]
    rejected: list[int] = []
    dropped = dedup.near_duplicates(bands, sigs, candidates, 0.85, (values, offsets), rejected)
    estimated = dedup.near_duplicates(bands, sigs, candidates, 0.85)
    sets = [set(values[offsets[k]:offsets[k + 1]].tolist()) for k in range(len(texts))]

    def best(k: int) -> float:  # an independent brute force over every earlier candidate
        return max((len(sets[k] & sets[j]) / len(sets[k] | sets[j]) for j in np.flatnonzero(candidates[:k])),
                   default=0.0)

    assert all(best(k) >= 0.85 for k in np.flatnonzero(dropped))
    assert sorted(rejected) == np.flatnonzero(estimated & ~dropped).tolist()
    assert all(best(k) < 0.85 for k in rejected)
    assert len(rejected) > 0 and dropped.sum() > 0  # the real file has both kinds


def test_truncation_counts_samples_and_dropped_messages(tmp_path: Path):
    from test_data_pipeline import chat, demo_plan, write_jsonl

    from impruver.data import pipeline

    long = {"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y " * 10},
                         {"role": "user", "content": "short question"}, {"role": "assistant", "content": "fine"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [chat(i) for i in range(10)] + [long])
    result = pipeline.compose(demo_plan(tmp_path, {"c": {"path": str(path), "format": "openai"}},
                                        length_policy="truncate"))
    row = json.loads(result.report_path.read_text())["sources"]["c"]
    assert (row["truncated"], row["dropped_messages"], row["too_long"], row["kept"]) == (1, 2, 0, 11)


@needs_shared
def test_reasoning_a_template_leaves_out_is_counted(tmp_path: Path):
    """Qwen3 writes the reasoning of the turns after the last user message only."""
    from data_helpers import encoder_for

    encoder = encoder_for(qwen3_tokenizer(tmp_path / "qwen3"))
    conversation = {"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning": "two and two"},
        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6", "reasoning": "three and three"}]}
    ((sample,),) = encoder.encode([conversation], SourceOptions(max_tokens=4096))
    assert sample.reasoning_dropped == 1


def test_add_eos_never_duplicates_an_eos_the_template_wrote():
    """A template ending each turn with "EOS\\n": add_eos adds nothing; add_bos adds BOS once."""
    from data_helpers import encoder_for, runs, word_tokenizer

    template = ("{% for m in messages %}{{ bos_token if loop.first else '' }}{{ m['role'] }}\n{{ m['content'] }}"
                "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}assistant\n{% endif %}")
    tok = word_tokenizer(["user", "assistant", "hi", "hello"])
    encoder = encoder_for(tok, template)
    conversation = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ((plain,),) = encoder.encode([conversation], SourceOptions(max_tokens=64))
    ((added,),) = encoder.encode([conversation], SourceOptions(max_tokens=64, add_eos=True, add_bos=True))
    assert added.input_ids == plain.input_ids and added.labels == plain.labels
    assert tok.convert_ids_to_tokens(added.input_ids).count("</s>") == 2  # one per turn, none added
    assert [tok.convert_ids_to_tokens(r) for r in runs(added.input_ids, added.labels)] == [["hello", "</s>"]]
    bare = encoder_for(tok, template.replace("{{ eos_token }}\n", "\n").replace("{{ bos_token if loop.first else '' }}",
                                                                                 ""))
    ((closed,),) = bare.encode([conversation], SourceOptions(max_tokens=64, add_eos=True, add_bos=True))
    tokens = tok.convert_ids_to_tokens(closed.input_ids)
    assert tokens[0] == "<s>" and tokens[-1] == "</s>" and tokens.count("</s>") == 1


def test_add_bos_without_a_bos_token_is_refused_before_any_record(tmp_path: Path):
    import pytest

    from impruver.data.pipeline import check_special_tokens
    from impruver.errors import ConfigError

    plan = SimpleNamespace(sources={"a": SimpleNamespace(add_bos=True, add_eos=False),
                                    "b": SimpleNamespace(add_bos=True, add_eos=True)})
    tokenizer = SimpleNamespace(bos_token_id=None, eos_token_id=2)
    with pytest.raises(ConfigError) as raised:
        check_special_tokens(plan, tokenizer)
    assert [p.key for p in raised.value.problems] == ["dataset.sources.a.add_bos", "dataset.sources.b.add_bos"]
    check_special_tokens(plan, SimpleNamespace(bos_token_id=1, eos_token_id=2))  # fine with both
