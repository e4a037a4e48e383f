"""Triton forward kernel of `local_attention` (flash-attention style, banded).

One program per (query block of one document, head). Its queries `[m0, m0 + BM)` (document-local) can only see

* sink keys `[0, min(S, band_start))`, and
* band keys `[band_start, min(m0 + BM, L))` with `band_start` = `max(0, m0 - W + 1)` rounded down to a key block,

so the two key loops together visit each key block that intersects the band or the sink exactly once and skip
everything else: O(BM * (W + S)) work per block instead of O(BM * T). The exact rule per element
(j <= i, i - j < W or j < S) is a mask. Softmax is online (running max and sum in fp32) and the log-sum-exp of
every row is saved for the backward pass.

Layouts (contiguous, packed): q `[T_total, H, D]`, k `[T_total, Hkv, D]`, v `[T_total, Hkv, Dv]`, o
`[T_total, H, Dv]`, lse `[T_total, H]` fp32, window/sink int32 `[H]` (clamped to the longest document by the
caller so no bound overflows), cu_seqlens int32 `[N+1]`, tiles int32 `[NT, 2]`. Query head h reads kv head
h // (H / Hkv).
"""
from __future__ import annotations

import triton
import triton.language as tl

from lctrain.kernels.addressing import split_row


@triton.jit
def allowed_pairs(offs_m, offs_n, length, window, sink):
    """[BM, BN] mask of (query i, key j) pairs that may attend: j <= i < L and (i - j < W or j < S)."""
    causal = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < length)
    return causal & ((offs_m[:, None] - offs_n[None, :] < window) | (offs_n[None, :] < sink))


@triton.jit
def key_ranges(m0, window, sink, BM: tl.constexpr, BN: tl.constexpr, length):
    """Key-block loop bounds for the query block starting at m0: sink blocks `[0, sink_end)` and band blocks
    `[band_start, band_end)`, disjoint."""
    band_start = tl.maximum(m0 - window + 1, 0) // BN * BN
    sink_end = tl.minimum(tl.cdiv(sink, BN) * BN, band_start)
    band_end = tl.minimum(m0 + BM, length)
    return sink_end, band_start, band_end


@triton.jit
def _attend_key_block(acc, m_i, l_i, b_q, k_seq, v_seq, n0, offs_m, length, window, sink, scale,
                      KV_STRIDE_K, KV_STRIDE_V, D, DV,
                      BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    n0_64, n0_low = split_row(n0)  # 64-bit high part, 32-bit low part of the key block start
    rows = n0_low + tl.arange(0, BN)
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    valid_n = offs_n < length
    b_k = tl.load(k_seq + n0_64 * KV_STRIDE_K + rows[:, None] * KV_STRIDE_K + offs_d[None, :],
                  mask=valid_n[:, None] & (offs_d < D)[None, :], other=0.0)
    b_v = tl.load(v_seq + n0_64 * KV_STRIDE_V + rows[:, None] * KV_STRIDE_V + offs_dv[None, :],
                  mask=valid_n[:, None] & (offs_dv < DV)[None, :], other=0.0)
    scores = tl.dot(b_q, tl.trans(b_k)) * scale
    scores = tl.where(allowed_pairs(offs_m, offs_n, length, window, sink), scores, float("-inf"))
    # m_i starts finite (-1e30), so a row with no allowed key in this block keeps alpha = 1 and p = 0.
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v)
    return acc, m_new, l_i


@triton.jit
def local_attention_fwd_kernel(
    q, k, v, o, lse, window_ptr, sink_ptr, cu_seqlens, tiles,
    scale, H, HKV, D, DV,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    # Grid: (query block of some document, head). Axis 0 walks the tile table `tiles` ([NT, 2] int32: document,
    # block within it; see `lctrain.kernels.tiles`), so any number of documents and tokens fits CUDA's grid.
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    i_n = tl.load(tiles + 2 * i_t)
    m0 = tl.load(tiles + 2 * i_t + 1) * BM
    i_hkv = i_h // (H // HKV)
    bos = tl.load(cu_seqlens + i_n)
    length = tl.load(cu_seqlens + i_n + 1) - bos
    window = tl.load(window_ptr + i_h)
    sink = tl.load(sink_ptr + i_h)
    # 64-bit base pointers for this (sequence, head) and 64-bit scalar block starts: token * row stride passes
    # 2^31 in one long document. Offsets inside a tile stay 32-bit (they cost registers).
    bos64 = tl.cast(bos, tl.int64)
    m0_64 = tl.cast(m0, tl.int64)
    q_blk = q + ((bos64 + m0_64) * H + i_h) * D
    k_seq = k + (bos64 * HKV + i_hkv) * D
    v_seq = v + (bos64 * HKV + i_hkv) * DV
    o_blk = o + ((bos64 + m0_64) * H + i_h) * DV
    lse_blk = lse + (bos64 + m0_64) * H + i_h

    rows = tl.arange(0, BM)
    offs_m = m0 + rows
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    valid_m = offs_m < length
    b_q = tl.load(q_blk + rows[:, None] * (H * D) + offs_d[None, :],
                  mask=valid_m[:, None] & (offs_d < D)[None, :], other=0.0)
    m_i = tl.full([BM], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    sink_end, band_start, band_end = key_ranges(m0, window, sink, BM, BN, length)
    for n0 in range(0, sink_end, BN):
        acc, m_i, l_i = _attend_key_block(acc, m_i, l_i, b_q, k_seq, v_seq, n0, offs_m, length, window, sink,
                                          scale, HKV * D, HKV * DV, D, DV, BN, BD, BDV)
    for n0 in range(band_start, band_end, BN):
        acc, m_i, l_i = _attend_key_block(acc, m_i, l_i, b_q, k_seq, v_seq, n0, offs_m, length, window, sink,
                                          scale, HKV * D, HKV * DV, D, DV, BN, BD, BDV)
    # Every valid query sees at least itself, so l_i > 0 there; padded rows are not stored.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(o_blk + rows[:, None] * (H * DV) + offs_dv[None, :], acc / l_safe[:, None],
             mask=valid_m[:, None] & (offs_dv < DV)[None, :])
    tl.store(lse_blk + rows * H, m_i + tl.log(l_safe), mask=valid_m)
