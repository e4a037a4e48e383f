"""Deterministic choices over documents: the held-out split and the per-epoch mixture order.

Everything here is a pure function of integers (seed, epoch, source index, document index) built on the
splitmix64 mixing function written out in numpy, not on a library random generator: a numpy upgrade can change
what `Generator.permutation` returns, which would silently change the batches a resumed run sees.

Mixture (one epoch): weights are shares of *tokens*. With `N` training tokens in all sources together (each
document counted as its tokens + BOS + EOS), source `s` contributes about `N * w_s / sum(w)` tokens: documents are
taken from a seeded permutation of the source until that budget is reached (the document crossing the budget is
included). A source whose budget exceeds its size is upsampled by whole passes, each a fresh permutation, so no
document repeats before every document of that source has been used; a source whose budget is smaller contributes
a different random subset each epoch. With a single source (or weights proportional to sizes) an epoch is exactly
one pass over every training document. The documents of all sources are then shuffled together.
"""
from __future__ import annotations

import numpy as np

_MASK = (1 << 64) - 1
SPLIT_SALT = 0x5EED_E7A1  # fixed, not train.seed: the held-out documents stay the same when the seed changes
_MIX_TAG = 0x4D49_58  # separates the cross-source shuffle from the per-source permutations
_TOKENIZER_SAMPLE_TAG = 0x544F_4B  # the tokenizer's training sample order


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def combine_key(*parts: int) -> int:
    """Fold several integers into one 64-bit key (order matters)."""
    key = 0
    for part in parts:
        key = int(_mix64(np.array([(key ^ (int(part) & _MASK))], dtype=np.uint64))[0])
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


def epoch_order(doc_tokens: list[np.ndarray], weights: list[float], seed: int, epoch: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The documents of one training epoch, in order.

    doc_tokens: per source, int64 `[n_docs_s]` token count of each document *including* its BOS and EOS.
    Returns (source_ids int64 `[M]`, doc_ids int64 `[M]`): the m-th document of the epoch is
    `doc_ids[m]` of source `source_ids[m]`. See the module docstring for the mixture rule.
    """
    total = int(sum(int(lengths.sum()) for lengths in doc_tokens))
    weight_sum = float(sum(weights))
    picked_sources, picked_docs = [], []
    for s, (lengths, weight) in enumerate(zip(doc_tokens, weights)):
        n_docs = len(lengths)
        if n_docs == 0:
            continue
        budget = max(1, round(total * weight / weight_sum))
        passes, taken = [], 0
        pass_index = 0
        while taken < budget:
            order = keyed_permutation(n_docs, seed, epoch, s, pass_index)
            passes.append(order)
            taken += int(lengths.sum())
            pass_index += 1
        docs = np.concatenate(passes)
        cumulative = np.cumsum(lengths[docs])
        count = min(len(docs), int(np.searchsorted(cumulative, budget, side="left")) + 1)
        picked_docs.append(docs[:count])
        picked_sources.append(np.full(count, s, dtype=np.int64))
    sources = np.concatenate(picked_sources)
    docs = np.concatenate(picked_docs)
    shuffle = keyed_permutation(len(docs), seed, epoch, _MIX_TAG)
    return sources[shuffle], docs[shuffle]


def sample_order(n_docs: int, source_index: int) -> np.ndarray:
    """The order in which the tokenizer trainer reads a source's documents (fixed, independent of train.seed)."""
    return keyed_permutation(n_docs, _TOKENIZER_SAMPLE_TAG, source_index)
