"""Dense float64 reference of `attention`: the ground truth of every test. Builds the full `[Tq, Tk]` mask, so it
is O(T^2) in memory: for tests only."""
from __future__ import annotations

import torch

from lctrain.kernels.attention.pattern import Pattern, allowed, document_bounds


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                    cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[B, Tq, H, D]`, k `[B, Tk, Hkv, D]`, v `[B, Tk, Hkv, Dv]` -> (o `[B, Tq, H, Dv]` float64,
    lse `[B, H, Tq]` float64). A query that sees nothing has o = 0 and lse = -inf. Differentiable by autograd."""
    heads, kv_heads = q.shape[2], k.shape[2]
    tq, tk = q.shape[1], k.shape[1]
    q_start, _ = document_bounds(cu_seqlens, pattern.q_offset, tq, q.device)
    k_start, _ = document_bounds(cu_seqlens, pattern.k_offset, tk, q.device)
    q_index = torch.arange(pattern.q_offset, pattern.q_offset + tq, device=q.device)
    k_index = torch.arange(pattern.k_offset, pattern.k_offset + tk, device=q.device)
    mask = allowed(pattern, q_index, q_start, k_index, k_start)                      # [Hm, Tq, Tk]
    group = heads // kv_heads
    k64 = k.double().repeat_interleave(group, dim=2)
    v64 = v.double().repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k64) * pattern.scale
    scores = scores.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe[..., None])
    return torch.einsum("bhij,bjhd->bihd", probs, v64), lse
