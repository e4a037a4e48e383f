"""Deterministic choices over documents: keys, hashes and keyed permutations (held-out split, tokenizer sample).

Everything here is a pure function of integers (seed, epoch, source index, document index) built on the
splitmix64 mixing function written out in numpy, not on a library random generator: a numpy upgrade can change
what `Generator.permutation` returns, which would silently change the batches a resumed run sees.

The training mixture and order built on these live in `lanes` (with `permute`).
"""
from __future__ import annotations

import numpy as np

_MASK = (1 << 64) - 1
SPLIT_SALT = 0x5EED_E7A1  # fixed, not train.seed: the held-out documents stay the same when the seed changes
_TOKENIZER_SAMPLE_TAG = 0x544F_4B  # the tokenizer's training sample order


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _mix64_int(value: int) -> int:
    """`_mix64` of one Python int (the same arithmetic modulo 2**64, without building arrays)."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def combine_key(*parts: int) -> int:
    """Fold several integers into one 64-bit key (order matters)."""
    key = 0
    for part in parts:
        key = _mix64_int(key ^ (int(part) & _MASK))
    return key


def keyed_hashes(n: int, *key: int) -> np.ndarray:
    """`[n]` uint64 pseudo-random values, one per index, fixed by `key`."""
    with np.errstate(over="ignore"):
        return _mix64(np.arange(n, dtype=np.uint64) ^ np.uint64(combine_key(*key)))


def keyed_permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of `range(n)` (int64 `[n]`) fixed by `key`."""
    return np.argsort(keyed_hashes(n, *key), kind="stable").astype(np.int64)


def eval_mask(n_docs: int, fraction: float) -> np.ndarray:
    """bool `[n_docs]`: True for held-out documents.

    A document is held out when its hash (salted, by index) falls below `fraction`, so the split of a given
    dataset never changes. When `fraction > 0` and there are >= 2 documents, at least one document is held out
    and at least one is kept for training.
    """
    if n_docs < 2 or fraction <= 0:  # a lone document is trained on
        return np.zeros(n_docs, dtype=bool)
    hashes = keyed_hashes(n_docs, SPLIT_SALT)
    unit = (hashes >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    held_out = unit < fraction
    if not held_out.any():
        held_out[np.argmin(unit)] = True
    if held_out.all():
        held_out[np.argmax(unit)] = False
    return held_out


def sample_order(n_docs: int, source_index: int) -> np.ndarray:
    """The order in which the tokenizer trainer reads a source's documents (fixed, independent of train.seed)."""
    return keyed_permutation(n_docs, _TOKENIZER_SAMPLE_TAG, source_index)
