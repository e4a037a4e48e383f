"""Blockwise PyTorch path of `attention` (CPU training and reference-quality fallback).

Queries are cut into blocks of `Q_BLOCK`; each block visits only the key ranges it can reach (`Pattern.key_ranges`,
host values), in pieces of at most `K_BLOCK` keys, with an online softmax (running max and sum, FlashAttention
style). Backward recomputes the probabilities from the saved log-sum-exp. The largest temporaries are one
`[B, H, Q_BLOCK, K_BLOCK]` score tile, so memory is linear in T; arithmetic runs in float32 (float64 for float64
inputs) whatever the input dtype.
"""
from __future__ import annotations

import torch

from lctrain.kernels.attention.pattern import Pattern, allowed, document_bounds

Q_BLOCK = 128
K_BLOCK = 512


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pieces(pattern: Pattern, q_lo: int, q_hi: int, k_len: int, size: int):
    """Local key pieces `(k0, k1)` of at most `size` keys that queries `[q_lo, q_hi)` (local) may see."""
    qo, ko = pattern.q_offset, pattern.k_offset
    for lo, hi in pattern.key_ranges(qo + q_lo, qo + q_hi, ko, ko + k_len):
        for start in range(lo, hi, size):
            yield start - ko, min(start + size, hi) - ko


class _Tiles:
    """Per-call index tensors and the mask of one (query block, key piece) tile, shaped to broadcast against
    `[B, Hkv, G, n_q, n_k]` scores."""

    def __init__(self, pattern: Pattern, cu_seqlens, tq: int, tk: int, heads: int, kv_heads: int, device):
        self.pattern, self.heads, self.kv_heads = pattern, heads, kv_heads
        self.q_start, _ = document_bounds(cu_seqlens, pattern.q_offset, tq, device)
        self.k_start, _ = document_bounds(cu_seqlens, pattern.k_offset, tk, device)
        self.q_index = torch.arange(pattern.q_offset, pattern.q_offset + tq, device=device)
        self.k_index = torch.arange(pattern.k_offset, pattern.k_offset + tk, device=device)

    def mask(self, a: int, b: int, k0: int, k1: int) -> torch.Tensor:
        m = allowed(self.pattern, self.q_index[a:b], self.q_start[a:b], self.k_index[k0:k1], self.k_start[k0:k1])
        if m.shape[0] == 1:
            return m[None]                                       # [1, 1, n_q, n_k]
        return m.view(self.kv_heads, self.heads // self.kv_heads, b - a, k1 - k0)


def _heads_first(x: torch.Tensor, kv_heads: int, dtype) -> torch.Tensor:
    """`[B, n, H, D]` -> `[B, Hkv, G, n, D]` in `dtype`."""
    b, n, h, d = x.shape
    return x.to(dtype).reshape(b, n, kv_heads, h // kv_heads, d).permute(0, 2, 3, 1, 4)


def _heads_last(x: torch.Tensor) -> torch.Tensor:
    """`[B, Hkv, G, n, D]` -> `[B, n, H, D]`."""
    b, hkv, g, n, d = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(b, n, hkv * g, d)


def blockwise_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                      cu_seqlens: torch.Tensor | None, q_block: int | None = None,
                      k_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o `[B, Tq, H, Dv]` in q's dtype, lse `[B, H, Tq]` in the compute dtype)."""
    q_block, k_block = q_block or Q_BLOCK, k_block or K_BLOCK
    batch, tq, heads, _ = q.shape
    tk, kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    dtype = compute_dtype(q.dtype)
    tiles = _Tiles(pattern, cu_seqlens, tq, tk, heads, kv_heads, q.device)
    o = q.new_empty(batch, tq, heads, value_dim)
    lse = torch.empty(batch, heads, tq, dtype=dtype, device=q.device)
    for a in range(0, tq, q_block):
        b = min(a + q_block, tq)
        qb = _heads_first(q[:, a:b], kv_heads, dtype)                      # [B, Hkv, G, n, D]
        m = qb.new_full(qb.shape[:-1], float("-inf"))
        l = qb.new_zeros(qb.shape[:-1])
        acc = qb.new_zeros(qb.shape[:-1] + (value_dim,))
        for k0, k1 in _pieces(pattern, a, b, tk, k_block):
            kb = k[:, k0:k1].to(dtype).permute(0, 2, 3, 1)[:, :, None]      # [B, Hkv, 1, D, n_k]
            vb = v[:, k0:k1].to(dtype).transpose(1, 2)[:, :, None]          # [B, Hkv, 1, n_k, Dv]
            s = (qb @ kb).mul_(pattern.scale).masked_fill_(~tiles.mask(a, b, k0, k1), float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s.sub_(m_safe[..., None]))
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vb
            m = m_new
        empty = l == 0                                                     # nothing visible: o = 0, lse = -inf
        l_safe = torch.where(empty, torch.ones_like(l), l)
        o[:, a:b] = _heads_last(acc / l_safe[..., None]).to(o.dtype)
        lse[:, :, a:b] = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(l_safe)).flatten(1, 2)
    return o, lse


def blockwise_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                       grad_o: torch.Tensor, grad_lse: torch.Tensor | None, pattern: Pattern,
                       cu_seqlens: torch.Tensor | None, q_block: int | None = None,
                       k_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients `(dq, dk, dv)` in the compute dtype, given the output `o` and log-sum-exp `lse` the
    probabilities are normalised by (the call's own, or the merged result of several blocks under SP).

    With P = exp(S - lse), delta = rowsum(dO * O) - dlse: dS = P * (dO V^T - delta), dQ = scale dS K,
    dK = scale dS^T Q, dV = P^T dO (the dlse term is the gradient through the returned log-sum-exp).
    """
    q_block, k_block = q_block or Q_BLOCK, k_block or K_BLOCK
    batch, tq, heads, _ = q.shape
    tk, kv_heads = k.shape[1], k.shape[2]
    dtype = compute_dtype(q.dtype)
    tiles = _Tiles(pattern, cu_seqlens, tq, tk, heads, kv_heads, q.device)
    delta = (o.to(dtype) * grad_o.to(dtype)).sum(-1).transpose(1, 2)        # [B, H, Tq]
    if grad_lse is not None:
        delta = delta - grad_lse.to(dtype)
    lse = lse.to(dtype)
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=dtype, device=q.device)
    group = heads // kv_heads
    for a in range(0, tq, q_block):
        b = min(a + q_block, tq)
        qb = _heads_first(q[:, a:b], kv_heads, dtype)
        dob = _heads_first(grad_o[:, a:b], kv_heads, dtype)
        shape = (batch, kv_heads, group, b - a, 1)
        lse_b = lse[:, :, a:b].reshape(shape)
        delta_b = delta[:, :, a:b].reshape(shape)
        dqb = torch.zeros_like(qb)
        for k0, k1 in _pieces(pattern, a, b, tk, k_block):
            kb = k[:, k0:k1].to(dtype).transpose(1, 2)[:, :, None]          # [B, Hkv, 1, n_k, D]
            vb = v[:, k0:k1].to(dtype).transpose(1, 2)[:, :, None]          # [B, Hkv, 1, n_k, Dv]
            s = (qb @ kb.transpose(-1, -2)).mul_(pattern.scale)
            s = s.masked_fill_(~tiles.mask(a, b, k0, k1), float("-inf"))
            p = torch.exp(s.sub_(lse_b))
            dv[:, k0:k1] += (p.transpose(-1, -2) @ dob).sum(2).transpose(1, 2)
            ds = p.mul_((dob @ vb.transpose(-1, -2)).sub_(delta_b))
            dqb += ds @ kb
            dk[:, k0:k1] += (ds.transpose(-1, -2) @ qb).sum(2).transpose(1, 2)
        dq[:, a:b] = _heads_last(dqb)
    return dq.mul_(pattern.scale), dk.mul_(pattern.scale), dv
