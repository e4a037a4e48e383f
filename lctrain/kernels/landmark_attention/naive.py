"""Dense float64 reference for `landmark_attention`: the grouped softmax of Mohtashami & Jaggi (2023), written
as one `[T, T]` weight matrix per (batch, head). The ground truth for every test.

For query i in block b (s_ij = scale q_i . k_j):
  * its group is the non-landmark tokens j <= i of block b plus the landmark of every earlier block c < b;
    p = softmax over the group gives weights p_ij for its own-block tokens and a gate g_ic = p_{i, landmark(c)};
  * each earlier block's non-landmark tokens form their own group: w_ij = g_ic softmax_{j in block c}(s_ij);
  * landmarks never contribute values: o_i = sum_j w_ij v_j.
A landmark query follows the same rule (its group is its block's other tokens and the earlier landmarks).
"""
from __future__ import annotations

import torch

from lctrain.kernels.landmark_attention.common import document_spans, landmark_mask


def landmark_weights(scores: torch.Tensor, block_size: int) -> torch.Tensor:
    """Attention weights `[..., T, T]` (rows sum to 1) from scaled scores `[..., T, T]` of one sequence."""
    length = scores.shape[-1]
    index = torch.arange(length, device=scores.device)
    block = index // block_size
    is_landmark = landmark_mask(length, block_size, scores.device)
    own = (block[None, :] == block[:, None]) & (index[None, :] <= index[:, None]) & ~is_landmark[None, :]
    earlier_landmark = is_landmark[None, :] & (block[None, :] < block[:, None])
    group = torch.softmax(scores.masked_fill(~(own | earlier_landmark), float("-inf")), dim=-1)
    weights = group * own
    for c in range(length // block_size):
        members = slice(c * block_size, (c + 1) * block_size - 1)  # block c without its landmark
        gate = group[..., :, (c + 1) * block_size - 1]  # zero for queries in blocks <= c
        inner = torch.softmax(scores[..., :, members], dim=-1)
        weights[..., :, members] = weights[..., :, members] + gate.unsqueeze(-1) * inner
    return weights


def naive_landmark_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Landmark attention (inputs already validated). q, k `[B, T, H, D]`, v `[B, T, H, V]`; cu_seqlens int
    `[N+1]` (B == 1) or None. Returns o `[B, T, H, V]` in q's dtype."""
    batch, length = q.shape[:2]
    rows: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    for row, start, end in document_spans(cu_seqlens, batch, length):  # in order along each row
        qd, kd, vd = (x[row, start:end].double().transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        weights = landmark_weights(qd @ kd.transpose(-1, -2) * scale, block_size)
        rows[row].append((weights @ vd).transpose(0, 1))
    return torch.stack([torch.cat(pieces, dim=0) for pieces in rows], dim=0).to(q.dtype)
