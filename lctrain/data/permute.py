"""A keyed permutation of `range(n)` evaluated at any index without materialising it.

`permuted(indices, n, key)` is `pi(indices)` for a bijection `pi` of `range(n)` fixed by `key`: a 4-round Feistel
network over the smallest even number of bits covering `n`, with cycle walking (an output >= n is fed through
the network again until it lands in range; the domain is < 4n, so that takes under 4 passes on average). Cost is
O(len(indices)) time and memory whatever `n` is, so a rank computes the positions it needs and nothing else.
The round function is splitmix64 written out in numpy (see `sampling`), so the order does not depend on a
library random generator.
"""
from __future__ import annotations

import numpy as np

from lctrain.data.sampling import _mix64, combine_key

ROUNDS = 4


def permuted(indices: np.ndarray, n: int, key: int) -> np.ndarray:
    """int64 `pi(indices)` for the keyed bijection `pi` of `range(n)`; `indices` int in `[0, n)`."""
    indices = np.asarray(indices, dtype=np.int64)
    if n <= 1 or len(indices) == 0:
        return indices.copy()
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    round_keys = [np.uint64(combine_key(key, r)) for r in range(ROUNDS)]
    out = np.empty(len(indices), dtype=np.int64)
    pending = np.arange(len(indices))
    values = indices.astype(np.uint64)
    while len(pending):
        left, right = values >> half, values & mask
        for round_key in round_keys:
            left, right = right, left ^ (_mix64(right ^ round_key) & mask)
        values = (left << half) | right
        inside = values < np.uint64(n)
        out[pending[inside]] = values[inside].astype(np.int64)
        pending, values = pending[~inside], values[~inside]
    return out
