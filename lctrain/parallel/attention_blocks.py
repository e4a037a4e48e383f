"""Blockwise masked softmax attention with log-sum-exp merging (the arithmetic shared by every SP strategy).

Shapes: q `[B, Tq, H, D]`, k / v `[B, Tk, Hkv, D]` (GQA: query head h reads kv head h // (H / Hkv)), mask
`[B, Tq, Tk]` bool (True = may attend), lse `[B, H, Tq]`. Arithmetic runs in at least float32 (float64 stays
float64); a query row with nothing to attend to has lse = -inf and output 0.
"""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def block_mask(q_index: torch.Tensor, q_doc: torch.Tensor, k_index: torch.Tensor, k_doc: torch.Tensor) -> torch.Tensor:
    """Causal + same-document mask. q_index `[Tq]` / k_index `[Tk]` global token indices, q_doc `[B, Tq]` /
    k_doc `[B, Tk]` document ids -> `[B, Tq, Tk]`."""
    causal = q_index[:, None] >= k_index[None, :]
    return causal[None] & (q_doc[:, :, None] == k_doc[:, None, :])


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[2], dim=2) if x.shape[2] != heads else x


def _probabilities(q, k, mask, scale, lse):
    dtype = compute_dtype(q.dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), _expand_kv(k, q.shape[2]).to(dtype)) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    # rows with nothing visible: lse = -inf; subtract 0 there so they give 0, not NaN
    probs = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    return probs, lse


def block_forward(q, k, v, mask, scale):
    """One block: `(o [B, Tq, H, D] normalised within the block, lse [B, H, Tq])`."""
    probs, lse = _probabilities(q, k, mask, scale, None)
    o = torch.einsum("bhqk,bkhd->bqhd", probs, _expand_kv(v, q.shape[2]).to(probs.dtype))
    return o, lse


def merge(o_acc, lse_acc, o_blk, lse_blk):
    """Combine two partial softmax results over disjoint key sets (None accumulators start the merge)."""
    if o_acc is None:
        return o_blk, lse_blk
    lse = torch.logaddexp(lse_acc, lse_blk)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_acc = torch.exp(lse_acc - safe).transpose(1, 2)[..., None]      # [B, Tq, H, 1]
    w_blk = torch.exp(lse_blk - safe).transpose(1, 2)[..., None]
    return o_acc * w_acc + o_blk * w_blk, lse


def block_backward(q, k, v, mask, scale, lse, grad_o, delta):
    """Gradients of one block given the *final* lse and delta = rowsum(dO * O) `[B, H, Tq]`.

    Returns `(dq [B, Tq, H, D], dk, dv [B, Tk, Hkv, D])` in the compute dtype.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    probs, _ = _probabilities(q, k, mask, scale, lse)
    dtype = probs.dtype
    grad_o = grad_o.to(dtype)
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, grad_o)
    dprobs = torch.einsum("bqhd,bkhd->bhqk", grad_o, _expand_kv(v, heads).to(dtype))
    dscores = probs * (dprobs - delta[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, _expand_kv(k, heads).to(dtype)) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q.to(dtype)) * scale
    if kv_heads != heads:
        group = heads // kv_heads
        dk = dk.reshape(dk.shape[0], dk.shape[1], kv_heads, group, -1).sum(3)
        dv = dv.reshape(dv.shape[0], dv.shape[1], kv_heads, group, -1).sum(3)
    return dq, dk, dv


def output_delta(o, grad_o):
    """rowsum(dO * O) `[B, H, Tq]` in the compute dtype."""
    dtype = compute_dtype(o.dtype)
    return (o.to(dtype) * grad_o.to(dtype)).sum(-1).transpose(1, 2)
