"""Exact and near-duplicate detection: normalization, MinHash estimates, LSH grouping, first occurrence kept."""

from __future__ import annotations

import random

import numpy as np

from impruver.data import dedup

WORDS = [f"w{i}" for i in range(200)]


def sig(words: list[str], num_perm: int = 256) -> np.ndarray:
    return dedup.signature(" ".join(words), num_perm=num_perm, shingle_size=5)


def test_exact_key_normalizes_case_and_whitespace_only():
    assert dedup.exact_key("Hello  World\n") == dedup.exact_key("hello world")
    assert dedup.exact_key("hello world") != dedup.exact_key("hello, world")


def test_minhash_estimates_jaccard_and_is_order_aware():
    base = sig(WORDS)
    changed = list(WORDS)
    changed[100] = "other"  # 5 of 196 shingles change: Jaccard = 191 / 201
    assert abs((base == sig(changed)).mean() - 191 / 201) < 0.06
    half = WORDS[:100] + [f"x{i}" for i in range(100)]
    assert abs((base == sig(half)).mean() - 96 / 296) < 0.08
    assert (base == sig(WORDS[::-1])).mean() < 0.05  # same bag of words, reversed: not a duplicate
    assert (dedup.shingles("a b c", 5) == dedup.shingles("A  b, c!", 5)).all()  # case and punctuation


def test_cyrillic_words_are_words():
    a = dedup.shingles("Привет мир как дела", 2)
    b = dedup.shingles("привет, мир! как дела?", 2)
    assert len(a) == 3 and (a == b).all()


def test_lsh_parameters_fit_the_signature():
    bands, rows = dedup.lsh_params(0.85, 128)
    assert bands * rows <= 128 and bands > 1
    assert dedup.lsh_params(0.5, 128)[1] < rows  # a lower threshold: fewer rows per band


def test_near_duplicates_keep_the_first_and_respect_candidates():
    texts = [WORDS, [*WORDS[:150], "y", *WORDS[151:]], WORDS[::-1], [f"z{i}" for i in range(200)], WORDS]
    sigs = np.stack([sig(t, 128) for t in texts])
    bands, rows = dedup.lsh_params(0.8, 128)
    keys = np.stack([dedup.band_keys(s, bands, rows) for s in sigs])
    everything = np.ones(len(texts), dtype=bool)
    assert dedup.near_duplicates(keys, sigs, everything, 0.8).tolist() == [False, True, False, False, True]
    without_first = np.array([False, True, True, True, True])
    assert dedup.near_duplicates(keys, sigs, without_first, 0.8).tolist() == [False, False, False, False, True]
    exact = np.array([dedup.exact_key(" ".join(t)) for t in texts], dtype=np.uint64)
    assert dedup.first_occurrences(exact, everything).tolist() == [False, False, False, False, True]


def test_batched_signatures_equal_one_by_one():
    rng = random.Random(3)
    vocab = ["привет", "мир", "Hello", "world", "foo_bar", "42", "ß", "İstanbul", "x"]
    texts = ["", " ", "!!!", "one", "a b c d e"]
    texts += ["".join(rng.choice(vocab) + rng.choice([" ", "\n", ", ", "  ", "!"]) for _ in range(rng.choice(
        [0, 1, 3, 4, 5, 6, 40, 300]))) for _ in range(400)]
    for size, num_perm, block in ((1, 16, 1), (2, 128, 50), (5, 128, 4096), (5, 128, 1024), (7, 32, 7)):
        batched = dedup.signatures(texts, num_perm=num_perm, shingle_size=size, block=block)
        single = np.stack([dedup.signature(t, num_perm=num_perm, shingle_size=size) for t in texts])
        assert batched.dtype == np.uint32 and (batched == single).all()
        bands = dedup.band_keys_of(batched, 4, num_perm // 4)
        assert (bands == np.stack([dedup.band_keys(s, 4, num_perm // 4) for s in single])).all()
    assert dedup.signatures([], num_perm=16, shingle_size=5).shape == (0, 16)
