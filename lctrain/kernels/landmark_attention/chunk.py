"""Blocked pure-PyTorch `landmark_attention`: the CPU training path (autograd by torch).

One query block at a time (Q_b `[L, D]`, L = block_size), so the largest intermediate is that block's row of
the score matrix:
  1. own-block scores Q_b K_b^T (causal, the block's landmark column masked) and landmark scores Q_b K_lm^T
     against the landmarks of blocks 0 .. b-1 share one softmax: own-block weights and gates g `[L, b]`;
  2. scores against every earlier block's non-landmark keys `[L, b, L-1]`, a softmax per block, scaled by g;
  3. o = own weights @ V_b + sum_c (gated block weights) @ V_c.
The sequence is padded to whole blocks; padded keys sit after every real query of the last (partial) block, so
the causal mask hides them, and that block's would-be landmark is never used (no block follows it).
Packed documents (`cu_seqlens`) run one document at a time, with blocks counted from each document start.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lctrain.kernels.landmark_attention.common import document_spans


def chunk_landmark_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blocked landmark attention (inputs already validated). q, k `[B, T, H, D]`, v `[B, T, H, V]`;
    cu_seqlens int `[N+1]` (B == 1) or None. Returns o `[B, T, H, V]` in q's dtype."""
    batch, length = q.shape[:2]
    if cu_seqlens is None:
        return _blocked_rows(q, k, v, block_size, scale)
    pieces = [_blocked_rows(q[:, start:end], k[:, start:end], v[:, start:end], block_size, scale)
              for _, start, end in document_spans(cu_seqlens, batch, length)]
    return torch.cat(pieces, dim=1)


def _blocked_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Every batch row is one sequence: q, k `[B, L, H, D]`, v `[B, L, H, V]` -> o `[B, L, H, V]`."""
    batch, length, heads, _ = q.shape
    value_dim = v.shape[-1]
    if length == 0:
        return v.new_zeros(batch, 0, heads, value_dim)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    size = block_size
    num_blocks = -(-length // size)
    pad = num_blocks * size - length

    def to_blocks(x: torch.Tensor) -> torch.Tensor:  # [B, L, H, D] -> [B, H, n, size, D]
        x = F.pad(x.to(compute), (0, 0, 0, 0, 0, pad))
        return x.view(batch, num_blocks, size, heads, -1).permute(0, 3, 1, 2, 4)

    qb, kb, vb = to_blocks(q), to_blocks(k), to_blocks(v)
    landmark_keys = kb[:, :, :, -1]  # [B, H, n, D]
    member_keys, member_values = kb[:, :, :, :-1], vb[:, :, :, :-1]  # non-landmark tokens of each block
    local = torch.arange(size, device=q.device)
    own_visible = (local[None, :] <= local[:, None]) & (local[None, :] != size - 1)  # [size, size]

    outputs = []
    for b in range(num_blocks):
        queries = qb[:, :, b] * scale  # [B, H, size, D]
        own = (queries @ kb[:, :, b].transpose(-1, -2)).masked_fill(~own_visible, float("-inf"))
        gate_scores = queries @ landmark_keys[:, :, :b].transpose(-1, -2)  # [B, H, size, b]
        group = torch.softmax(torch.cat([own, gate_scores], dim=-1), dim=-1)
        out = group[..., :size] @ vb[:, :, b]
        if b > 0:
            gates = group[..., size:]  # [B, H, size, b]
            inner = torch.einsum("bhqd,bhcjd->bhqcj", queries, member_keys[:, :, :b]).softmax(dim=-1)
            out = out + torch.einsum("bhqcj,bhcjv->bhqv", inner * gates.unsqueeze(-1), member_values[:, :, :b])
        outputs.append(out)
    o = torch.stack(outputs, dim=2)  # [B, H, n, size, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(batch, num_blocks * size, heads, value_dim)[:, :length]
    return o.to(q.dtype)
