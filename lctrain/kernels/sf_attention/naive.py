"""Dense float64 reference for `sf_attention`, written straight from the definition (O(T^2): tests only).

It shares no code with `segments.py`: the mask is built per (query, key) pair from row positions, groups and
document starts, so the segmented implementation is checked against an independent statement of the rule.
"""
from __future__ import annotations

import torch


def kv_head_index(heads: int, kv_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """Kv head read by each query head, long `[H]`: head h reads `h // (H / Hkv)` (GQA)."""
    return torch.arange(heads, device=device) // (heads // kv_heads)


def naive_sf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    sink: int = 4,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    variant: str = "sf",
) -> torch.Tensor:
    """Masked dense softmax attention with the SF-Attn ("sf") or S²-Attn ("s2") mask; arguments and result
    as in `sf_attention` (validated the same way). Returns o `[B, T, H, Dv]` in q's dtype."""
    from lctrain.kernels.sf_attention import _validate  # the package imports this module

    _validate(q, k, v, group_size, sink, scale, cu_seqlens, variant)
    batch, length, heads, head_dim = q.shape
    device = q.device
    if scale is None:
        scale = head_dim ** -0.5
    half = group_size // 2

    # Document id and row-relative document start of every token.
    flat = torch.arange(batch * length, device=device)
    row_start = (flat // length) * length if length else flat
    if cu_seqlens is None:
        doc_first = row_start
    else:
        offsets = cu_seqlens.to(device=device, dtype=torch.long)
        doc_first = offsets[torch.searchsorted(offsets, flat, right=True) - 1]
    doc = doc_first.view(batch, length)
    doc_start = (doc_first - row_start).view(batch, length)

    t = torch.arange(length, device=device)
    i, j = t[:, None], t[None, :]
    same_doc = doc[:, :, None] == doc[:, None, :]  # [B, i, j]
    causal = (j <= i)[None]
    is_sink = (j[None] - doc_start[:, :, None]) < sink  # key j among the first `sink` of query i's document
    plain = (i // group_size == j // group_size)[None]
    if variant == "sf":
        shifted = ((i + half) // group_size == (j + half) // group_size)[None]
        mask_plain = same_doc & causal & (plain | is_sink)
        mask_shifted = same_doc & causal & (shifted | is_sink)
    else:
        rolled = (t - half) % length  # rolled position of token t (token t sits at r = (t - G/2) mod T)
        ri, rj = rolled[:, None], rolled[None, :]
        mask_plain = same_doc & causal & plain
        mask_shifted = same_doc & ((rj <= ri) & (ri // group_size == rj // group_size))[None]
    is_shifted = torch.arange(heads, device=device) >= heads // 2
    mask = torch.where(is_shifted[None, :, None, None], mask_shifted[:, None], mask_plain[:, None])  # [B,H,i,j]

    kv = kv_head_index(heads, k.shape[2], device)
    k64, v64 = k.double()[:, :, kv], v.double()[:, :, kv]
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k64) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhij,bjhd->bihd", probs, v64).to(q.dtype)
