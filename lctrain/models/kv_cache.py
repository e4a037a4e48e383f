"""Decoding cache of the softmax-attention mixer: keys and values of every token seen so far (after RoPE), per
layer, one document per row; new queries attend the whole cache through the attention op's block form
(`q_offset` = tokens already cached), so no dense mask is built. With a KV budget the H2O cache
(`lctrain.models.h2o`) keeps a bounded subset instead."""
from __future__ import annotations

from typing import Callable

import torch

from lctrain.kernels.attention import attention


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, entry: dict, scale: float,
                  spans: Callable[[int], tuple] | None = None, kv_budget: tuple[int, int] | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """Append k, v `[B, n, Hkv, D]` to `entry` (this layer's cache dict) and attend q `[B, n, H, D]` to the cache.

    spans: `length -> (window, sink)` of a sparse pattern (MoA: windows depend on the length reached so far; every
    key stays cached) or None (full attention). kv_budget: `(budget, recent)` for H2O eviction (full only).
    Returns `[B, n, H, Dv]`.
    """
    if kv_budget is not None:
        if spans is not None:
            raise ValueError("attn: a KV budget (H2O) and a sparse attention pattern cannot be combined")
        from lctrain.models.h2o import h2o_attend
        return h2o_attend(q, k, v, entry, *kv_budget, scale)
    if "k" in entry:
        k = torch.cat([entry["k"], k], dim=1)
        v = torch.cat([entry["v"], v], dim=1)
    entry["k"], entry["v"] = k, v
    new, total = q.shape[1], k.shape[1]
    window, sink = spans(total) if spans is not None else (None, 0)
    return attention(q, k, v, window=window, sink=sink, scale=scale, q_offset=total - new, backend=backend)
