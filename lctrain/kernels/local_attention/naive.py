"""Dense reference for `local_attention`, computed in float64: the ground truth for every test.

Query i attends key j iff j <= i, both lie in the same document, and (i - j < window or j - doc_start < sink).
Builds the full `[T, T]` mask, so it is O(T^2): for tests only.
"""
from __future__ import annotations

import torch

from lctrain.kernels.local_attention.common import document_starts, per_head_spans


def naive_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | torch.Tensor,
    sink: int | torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked dense softmax attention (inputs already validated).

    Args:
        q: `[B, T, H, D]`.  k: `[B, T, Hkv, D]`.  v: `[B, T, Hkv, Dv]` (Hkv divides H; head h reads kv head
            h // (H / Hkv)).
        window, sink: ints or int tensors `[H]`.
        scale: multiplies q.k before the softmax.
        cu_seqlens: int `[N+1]` document offsets (B == 1) or None (one document per row).

    Returns:
        o `[B, T, H, Dv]` in q's dtype.
    """
    batch, length, heads, _ = q.shape
    group = heads // k.shape[2]
    windows, sinks = per_head_spans(window, sink, heads, q.device)
    k64 = k.double().repeat_interleave(group, dim=2)
    v64 = v.double().repeat_interleave(group, dim=2)
    starts = document_starts(cu_seqlens, batch, length, q.device)  # [B, T]
    index = torch.arange(length, device=q.device)
    causal = index[None, :] <= index[:, None]  # [i, j]
    same_doc = starts[:, :, None] == starts[:, None, :]  # [B, i, j]
    in_window = (index[:, None] - index[None, :])[None] < windows[:, None, None]  # [H, i, j]
    from_start = index[None, None, :] - starts[:, :, None]  # j - doc_start(i), [B, i, j]
    in_sink = from_start[:, None] < sinks[None, :, None, None]  # [B, H, i, j]
    mask = (causal & same_doc)[:, None] & (in_window[None] | in_sink)
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k64) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhij,bjhd->bihd", probs, v64).to(q.dtype)
