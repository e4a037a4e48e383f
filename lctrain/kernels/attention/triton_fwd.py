"""Triton forward kernel of `attention` (FlashAttention-2 style, block form, packed documents, window + sink).

One program per (query block, row * head). Queries are local indices `[0, Tq)` at global `q_offset + i`, keys
local `[0, Tk)` at global `k_offset + j`; `q_start` / `k_start` give every token's global document start. The
queries `[m0, m0 + BM)` can only see

* band keys from `max(first document start, first query - W + 1)` to the last query, and
* sink keys `[first document start, + S)` before the band (later documents start inside the block, so their sinks
  are in the band),

so the two key loops visit only those blocks; the exact rule (same document, j <= i, i - j < W or
j - start < S) is a mask. Online softmax in fp32; o is normalised, lse = -inf (o = 0) where nothing is visible.

Layouts (contiguous): q `[B, Tq, H, D]`, k `[B, Tk, Hkv, D]`, v `[B, Tk, Hkv, Dv]`, o `[B, Tq, H, Dv]`,
lse `[B, H, Tq]` fp32, q_start `[Tq]`, k_start `[Tk]`, window / sink `[H]` int32 (no window: a huge window).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def visible(offs_m, offs_n, q_pos, k_pos, b_qs, b_ks, n_lo, n_hi, TQ, window, sink):
    """[BM, BN] mask of (query, key) pairs that may attend; keys outside `[n_lo, n_hi)` are left to other loops."""
    rows = (offs_m < TQ)[:, None]
    cols = ((offs_n >= n_lo) & (offs_n < n_hi))[None, :]
    same = b_qs[:, None] == b_ks[None, :]
    causal = k_pos[None, :] <= q_pos[:, None]
    span = ((q_pos[:, None] - k_pos[None, :]) < window) | ((k_pos - b_ks)[None, :] < sink)
    return rows & cols & same & causal & span


@triton.jit
def key_loops(first_start, q_lo, q_hi, k_offset, TK, window, sink):
    """Local key bounds `(sink_lo, sink_hi, band_lo, band_hi)` of a query block with global queries
    `[q_lo, q_hi)` whose first query's document starts at `first_start`."""
    band_lo = tl.maximum(first_start, q_lo - window + 1)
    sink_hi = tl.minimum(first_start + sink, band_lo)
    sink_lo = tl.minimum(tl.maximum(first_start - k_offset, 0), TK)
    sink_hi = tl.minimum(tl.maximum(sink_hi - k_offset, sink_lo), TK)
    band_lo = tl.minimum(tl.maximum(band_lo - k_offset, 0), TK)
    band_hi = tl.minimum(tl.maximum(q_hi - k_offset, band_lo), TK)
    return sink_lo, sink_hi, band_lo, band_hi


@triton.jit
def _attend(acc, m_i, l_i, b_q, k_row, v_row, k_start, n0, n_lo, n_hi, offs_m, q_pos, b_qs, k_offset, TQ, TK,
            window, sink, scale, K_STRIDE, V_STRIDE, D, DV, BN: tl.constexpr, BD: tl.constexpr):
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    valid_n = offs_n < TK
    b_k = tl.load(k_row + offs_n[:, None] * K_STRIDE + offs_d[None, :],
                  mask=valid_n[:, None] & (offs_d < D)[None, :], other=0.0)
    b_v = tl.load(v_row + offs_n[:, None] * V_STRIDE + offs_d[None, :],
                  mask=valid_n[:, None] & (offs_d < DV)[None, :], other=0.0)
    b_ks = tl.load(k_start + offs_n, mask=valid_n, other=-1)
    k_pos = k_offset + offs_n
    scores = tl.dot(b_q, tl.trans(b_k)) * scale
    scores = tl.where(visible(offs_m, offs_n, q_pos, k_pos, b_qs, b_ks, n_lo, n_hi, TQ, window, sink), scores,
                      float("-inf"))
    # m_i starts finite (-1e30): a row with nothing visible here keeps alpha = 1 and p = 0.
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v)
    return acc, m_new, l_i


@triton.jit
def attention_fwd_kernel(
    q, k, v, o, lse, q_start, k_start, window_ptr, sink_ptr,
    scale, TQ, TK, q_offset, k_offset, H, HKV, D, DV,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hkv = i_h // (H // HKV)
    m0 = i_m * BM
    window = tl.load(window_ptr + i_h)
    sink = tl.load(sink_ptr + i_h)
    b64 = tl.cast(i_b, tl.int64)
    q_row = q + (b64 * TQ * H + i_h) * D
    o_row = o + (b64 * TQ * H + i_h) * DV
    k_row = k + (b64 * TK * HKV + i_hkv) * D
    v_row = v + (b64 * TK * HKV + i_hkv) * DV
    lse_row = lse + (b64 * H + i_h) * TQ

    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    valid_m = offs_m < TQ
    b_q = tl.load(q_row + offs_m[:, None] * (H * D) + offs_d[None, :],
                  mask=valid_m[:, None] & (offs_d < D)[None, :], other=0.0)
    b_qs = tl.load(q_start + offs_m, mask=valid_m, other=-2)
    q_pos = q_offset + offs_m
    m_i = tl.full([BM], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    first_start = tl.load(q_start + m0)
    q_hi = q_offset + tl.minimum(m0 + BM, TQ)
    sink_lo, sink_hi, band_lo, band_hi = key_loops(first_start, q_offset + m0, q_hi, k_offset, TK, window, sink)
    for n0 in range(sink_lo, sink_hi, BN):
        acc, m_i, l_i = _attend(acc, m_i, l_i, b_q, k_row, v_row, k_start, n0, sink_lo, sink_hi, offs_m, q_pos,
                                b_qs, k_offset, TQ, TK, window, sink, scale, HKV * D, HKV * DV, D, DV, BN, BD)
    for n0 in range(band_lo, band_hi, BN):
        acc, m_i, l_i = _attend(acc, m_i, l_i, b_q, k_row, v_row, k_start, n0, band_lo, band_hi, offs_m, q_pos,
                                b_qs, k_offset, TQ, TK, window, sink, scale, HKV * D, HKV * DV, D, DV, BN, BD)
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    tl.store(o_row + offs_m[:, None] * (H * DV) + offs_d[None, :], acc / l_safe[:, None],
             mask=valid_m[:, None] & (offs_d < DV)[None, :])
    tl.store(lse_row + offs_m, tl.where(seen, m_i + tl.log(l_safe), float("-inf")), mask=valid_m)
