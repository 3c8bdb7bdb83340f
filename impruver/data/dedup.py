"""Exact and near-duplicate detection across every source, before the train / validation split.

* Exact: a 64-bit hash of the normalized text (lower case, runs of whitespace collapsed).
* Near: MinHash over word shingles (``shingle_size`` consecutive words, so word ORDER matters: a text and its
  reversal share almost no shingles), LSH banding to find candidates, a check that the estimated Jaccard
  similarity reaches ``threshold``, then the exact Jaccard similarity of the two shingle sets (an estimate from
  128 permutations is off by ~0.03, enough to drop pairs at 0.80). The first occurrence is kept.

Signatures are computed in the worker processes (:func:`signature`); the grouping works on numpy arrays, so a
million conversations cost a few hundred MB of arrays, not a million Python objects.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import xxhash



_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, runs of whitespace as one space (``" ".join(text.lower().split())`` without a list of every
    word: a 5 MB document would make a million strings)."""
    return _SPACES.sub(" ", text.lower()).strip()


def exact_key(text: str) -> int:
    """64-bit hash of the normalized text."""
    return xxhash.xxh64_intdigest(normalize(text).encode())


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit finalizer (splitmix64), vectorized: spreads the bits of a polynomial hash."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


# Bytes that belong to words: ASCII letters and digits, "_", and every byte of a non-ASCII character (Cyrillic...).
_WORD_BYTE = np.zeros(256, dtype=bool)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
    _WORD_BYTE[_c] = True
_WORD_BYTE[0x80:] = True
_BASE = np.uint64(1_000_003)
_GRAM_MULTIPLIERS = [np.uint64((0x9E3779B97F4A7C15 * (2 * j + 1)) % (1 << 64) | 1) for j in range(64)]


_POWERS = np.cumprod(np.full(1 << 12, _BASE, dtype=np.uint64), dtype=np.uint64)


def _powers(length: int) -> np.ndarray:
    """BASE**1 .. BASE**length (mod 2**64), from a table that grows by doubling."""
    global _POWERS
    if length > len(_POWERS):
        size = 1 << (length - 1).bit_length()
        _POWERS = np.cumprod(np.full(size, _BASE, dtype=np.uint64), dtype=np.uint64)
    return _POWERS[:length]


_INVERSE = np.uint64(pow(1_000_003, -1, 1 << 64))  # BASE * _INVERSE == 1 (mod 2**64)
_INVERSE_POWERS = np.cumprod(np.r_[np.uint64(1), np.full((1 << 12) - 1, _INVERSE, dtype=np.uint64)],
                             dtype=np.uint64)


def _inverse_powers(length: int) -> np.ndarray:
    """BASE**0 .. BASE**-(length - 1) (mod 2**64), from a table that grows by doubling."""
    global _INVERSE_POWERS
    if length > len(_INVERSE_POWERS):
        size = 1 << (length - 1).bit_length()
        _INVERSE_POWERS = np.cumprod(np.r_[np.uint64(1), np.full(size - 1, _INVERSE, dtype=np.uint64)],
                                     dtype=np.uint64)
    return _INVERSE_POWERS[:length]


_WINDOW_BYTES = 1 << 20  # bytes hashed at once: the per-byte uint64 temporaries stay ~40 MB for any text size


def _word_hashes(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The hash and first byte of every word of ``data`` (uint8), hashed in windows of about _WINDOW_BYTES cut
    between words: memory is bounded per window, not per document, and a word's hash depends on its bytes only.

    A word's hash sums byte * BASE**(place in word + 1). With every byte weighted by BASE**(place in the window
    + 1) instead, a word's sum is BASE**start times its hash, and BASE is odd, so invertible mod 2**64: one
    multiplication per word by BASE**-start gives the same hash with no per-byte gather.

    Returns:
        (words,) uint64 hashes (mixed) and (words,) int64 positions in ``data``.
    """
    hashes, firsts = [], []
    start, size = 0, len(data)
    while start < size:
        stop = min(size, start + _WINDOW_BYTES)
        while stop < size and _WORD_BYTE[data[stop]]:  # move the cut to the next byte outside a word
            gaps = np.flatnonzero(~_WORD_BYTE[data[stop:stop + 4096]])
            stop = min(size, stop + (int(gaps[0]) if len(gaps) else 4096))
        inside = _WORD_BYTE[data[start:stop]]
        begins = inside.copy()
        begins[1:] &= ~inside[:-1]  # the first byte of each word
        if begins.any():
            word_bytes = data[start:stop][inside].astype(np.uint64)
            starts = np.flatnonzero(begins[inside])  # where each word starts among the word bytes
            summed = np.add.reduceat(word_bytes * _powers(len(word_bytes)), starts)
            hashes.append(_mix(summed * _inverse_powers(len(word_bytes))[starts]))
            firsts.append(np.flatnonzero(begins) + start)
        start = stop
    if not hashes:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    return np.concatenate(hashes), np.concatenate(firsts)


def shingles(text: str, size: int) -> np.ndarray:
    """64-bit hashes of the distinct runs of ``size`` consecutive words (order-aware), all in numpy.

    Words are runs of letters, digits, "_" and non-ASCII characters of the lower-cased UTF-8 text. A word's hash
    is a polynomial of its bytes; a shingle combines its words' hashes with position-dependent multipliers, so
    "a b" and "b a" differ. uint64 arithmetic wraps, deterministically.
    """
    word_hash, _ = _word_hashes(np.frombuffer(text.lower().encode("utf-8"), dtype=np.uint8))
    if len(word_hash) == 0:
        return np.zeros(1, dtype=np.uint64)
    count = len(word_hash)
    span = min(size, count)
    grams = np.zeros(count - span + 1, dtype=np.uint64)
    for j in range(span):  # shingle = sum over its words of word_hash * multiplier of the word's place
        grams += word_hash[j:count - span + 1 + j] * _GRAM_MULTIPLIERS[j % 64]
    return np.unique(_mix(grams))


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)  # fixed: signatures must not change between runs
    a = rng.randint(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    b = rng.randint(0, 1 << 63, size=num_perm, dtype=np.uint64)
    return a, b


def signature(text: str, *, num_perm: int, shingle_size: int) -> np.ndarray:
    """The MinHash signature of ``text``: ``num_perm`` uint32 values."""
    hashes = shingles(text, shingle_size)
    a, b = _permutations(num_perm)
    # Multiply-shift hashing, one function per permutation: the top 32 bits of a * h + b (mod 2^64).
    values = np.multiply.outer(hashes, a)  # (n_shingles, num_perm); in place below: no temporaries
    values += b
    values >>= np.uint64(32)
    return values.min(axis=0).astype(np.uint32)


def signatures(texts: list[str], *, num_perm: int, shingle_size: int, block: int = 1 << 12) -> np.ndarray:
    """MinHash signatures of many texts at once, exactly as :func:`signature` gives them one by one.

    All texts' words are hashed in numpy windows (joined by a newline, which no word contains), shingles are
    kept only where all their words belong to the same text, and the permutations run as one (shingles, num_perm)
    matrix product per block of about ``block`` shingles; a text's minimum is taken over its shingles with
    ``np.minimum.reduceat``. Duplicate shingles need no removal: they do not change a minimum. Texts with fewer
    than ``shingle_size`` words (one shorter shingle, or none) go through :func:`signature`.

    Returns:
        (len(texts), num_perm) uint32.
    """
    out = np.zeros((len(texts), num_perm), dtype=np.uint32)
    if not texts:
        return out
    encoded = [t.lower().encode("utf-8") for t in texts]
    data = np.frombuffer(b"\n".join(encoded), dtype=np.uint8)
    text_start = np.zeros(len(texts), dtype=np.int64)  # first byte of each text in ``data``
    np.cumsum([len(e) + 1 for e in encoded[:-1]], out=text_start[1:])
    word_hash, word_first_byte = _word_hashes(data)  # (words,): hash, position in ``data``
    word_text = np.searchsorted(text_start, word_first_byte, side="right") - 1  # (words,) text of each word
    words_per_text = np.bincount(word_text, minlength=len(texts))
    a, b = _permutations(num_perm)
    short = np.flatnonzero(words_per_text < shingle_size)
    for k in short:  # a single shorter shingle (or none): the one-by-one path, rare
        out[k] = signature(texts[k], num_perm=num_perm, shingle_size=shingle_size)
    if len(short) == len(texts):
        return out
    count = len(word_hash)
    grams = np.zeros(count - shingle_size + 1, dtype=np.uint64)
    for j in range(shingle_size):  # as in shingles(): word hash times the multiplier of its place
        grams += word_hash[j:count - shingle_size + 1 + j] * _GRAM_MULTIPLIERS[j % 64]
    whole = word_text[:len(grams)] == word_text[shingle_size - 1:]  # all words of the shingle in one text
    grams = _mix(grams[whole])
    gram_text = word_text[:len(whole)][whole]  # (grams,) non-decreasing
    present = np.flatnonzero(words_per_text >= shingle_size)  # texts that have grams, in order
    first = np.searchsorted(gram_text, present)  # each such text's first gram
    # Blocks of ``block`` shingles, cut anywhere (a long document spans many): each block's minimum per text it
    # touches, folded into a running minimum per text. Memory: one (num_perm, block) matrix, whatever the sizes.
    lowest = np.full((len(present), num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    for lo in range(0, len(grams), block):
        hi = min(len(grams), lo + block)
        values = np.multiply.outer(a, grams[lo:hi])  # (num_perm, shingles)
        values += b[:, None]
        t0 = int(np.searchsorted(first, lo, side="right")) - 1  # the text holding shingle ``lo``
        t1 = int(np.searchsorted(first, hi, side="left"))  # texts t0..t1-1 have shingles in the block
        segments = np.maximum(first[t0:t1], lo) - lo  # strictly increasing, the first 0
        np.minimum(lowest[t0:t1], np.minimum.reduceat(values, segments, axis=1).T, out=lowest[t0:t1])
    # The top 32 bits of the minimum are the minimum of the top 32 bits (>> is monotonic): shift after.
    out[present] = (lowest >> np.uint64(32)).astype(np.uint32)
    return out


@lru_cache(maxsize=32)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positives + false negatives around ``threshold`` (as datasketch does)."""
    grid = np.linspace(0, 1, 201)
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            probability = 1 - (1 - grid**rows) ** bands
            below, above = grid <= threshold, grid >= threshold
            error = np.trapezoid(probability[below], grid[below]) + np.trapezoid(1 - probability[above], grid[above])
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per band of a signature."""
    view = sig[: bands * rows].reshape(bands, rows)
    return np.fromiter((xxhash.xxh64_intdigest(row.tobytes()) for row in view), dtype=np.uint64, count=bands)


def band_keys_of(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """:func:`band_keys` of every row of ``sigs`` ((n, num_perm) uint32): (n, bands) uint64."""
    width = sigs.shape[1] * 4  # bytes per signature
    data = np.ascontiguousarray(sigs, dtype=np.uint32).tobytes()
    step = rows * 4
    keys = [xxhash.xxh64_intdigest(data[u + band * step:u + band * step + step])
            for u in range(0, len(data), width) for band in range(bands)]
    return np.array(keys, dtype=np.uint64).reshape(len(sigs), bands)


def first_occurrences(keys: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Boolean mask over ``keys``: True where a candidate's key was already seen at an earlier candidate."""
    duplicate = np.zeros(len(keys), dtype=bool)
    index = np.flatnonzero(candidates)
    if len(index) == 0:
        return duplicate
    _, first = np.unique(keys[index], return_index=True)
    keep = np.zeros(len(index), dtype=bool)
    keep[first] = True
    duplicate[index[~keep]] = True
    return duplicate


def shingle_sets(texts: list[str], *, shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every text's distinct shingle hashes (:func:`shingles`), concatenated, and how many each text has."""
    sets = [shingles(text, shingle_size) for text in texts]
    counts = np.fromiter((len(s) for s in sets), dtype=np.int64, count=len(sets))
    return (np.concatenate(sets) if sets else np.zeros(0, dtype=np.uint64)), counts


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sets of distinct shingle hashes."""
    common = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - common
    return common / union if union else 1.0


def near_duplicates(bands: np.ndarray, signatures: np.ndarray, candidates: np.ndarray, threshold: float,
                    shingled: tuple[np.ndarray, np.ndarray] | None = None,
                    rejected: list[int] | None = None) -> np.ndarray:
    """Boolean mask: True for a candidate whose Jaccard similarity with an earlier candidate sharing one of its
    LSH bands reaches ``threshold``: estimated from the signatures, then (with ``shingled``) confirmed exactly.

    Args:
        bands: (n, bands) uint64 band keys.
        signatures: (n, num_perm) uint32 MinHash signatures (a memmap is fine: only candidate rows are read).
        candidates: (n,) bool, the rows to consider (valid, not exact duplicates).
        threshold: Jaccard similarity that counts as a duplicate.
        shingled: (shingle hashes of all rows concatenated, (n + 1,) offsets of each row's); memmaps are fine.
        rejected: when given, receives the rows whose estimate passed but whose exact similarity did not.
    """
    index = np.flatnonzero(candidates)
    duplicate = np.zeros(len(candidates), dtype=bool)
    if len(index) < 2:
        return duplicate
    pairs = []
    for band in range(bands.shape[1]):
        column = bands[index, band]
        order = np.argsort(column, kind="stable")  # equal keys stay in index order: the first is the earliest
        sorted_keys = column[order]
        starts = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
        group_first = np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
        later = ~starts
        pairs.append(np.stack([index[order[later]], index[order[group_first[later]]]], axis=1))
    found = np.unique(np.concatenate(pairs), axis=0) if pairs else np.empty((0, 2), dtype=np.int64)
    passing = [np.empty((0, 2), dtype=np.int64)]  # (later, earlier) pairs whose estimate reaches the threshold
    for start in range(0, len(found), 65536):  # bounded memory: candidate pairs in blocks
        block = found[start:start + 65536]
        similarity = (np.asarray(signatures[block[:, 0]]) == np.asarray(signatures[block[:, 1]])).mean(axis=1)
        passing.append(block[similarity >= threshold])
        duplicate[passing[-1][:, 0]] = True
    if shingled is not None:
        estimated = duplicate.copy()
        duplicate[:] = False
        values, offsets = shingled
        for later, earlier in np.concatenate(passing):  # only pairs the estimate let through: few
            if not duplicate[later] and jaccard(
                    np.asarray(values[offsets[later]:offsets[later + 1]]),
                    np.asarray(values[offsets[earlier]:offsets[earlier + 1]])) >= threshold:
                duplicate[later] = True
        if rejected is not None:
            rejected.extend(np.flatnonzero(estimated & ~duplicate).tolist())
    return duplicate
