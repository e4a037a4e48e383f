"""Triton backward kernels of `attention` (FlashAttention-2 style, recomputing P from the saved log-sum-exp).

With P = exp(S - lse), delta = rowsum(dO * O) - dlse (computed by the caller; lse is the merged one under SP):

    dS = P * (dO V^T - delta),   dQ = scale dS K,   dK = scale dS^T Q,   dV = P^T dO

1. `attention_bwd_dq_kernel`: one program per (query block, row * head), visiting the forward's key blocks.
2. `attention_bwd_dkv_kernel`: one program per (key block, row * query head), visiting the queries that can reach
   it: from its first key to the end of its last key's document, cut at last key + W - 1 unless the block holds
   sink keys. Each query head writes its own fp32 dk / dv (`[B, Tk, H, D]`), summed over a GQA group by the caller:
   no atomics, deterministic.

Layouts as in `triton_fwd.py`; do `[B, Tq, H, Dv]`, lse / delta `[B, H, Tq]` fp32, k_end `[Tk]` (document ends).
"""
from __future__ import annotations

import triton
import triton.language as tl

from lctrain.kernels.attention.triton_fwd import key_loops, visible


@triton.jit
def _dq_block(b_dq, b_q, b_do, b_lse, b_delta, k_row, v_row, k_start, n0, n_lo, n_hi, offs_m, q_pos, b_qs,
              k_offset, TQ, TK, window, sink, scale, K_STRIDE, V_STRIDE, D, DV, BN: tl.constexpr,
              BD: tl.constexpr):
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
    allowed = visible(offs_m, offs_n, q_pos, k_pos, b_qs, b_ks, n_lo, n_hi, TQ, window, sink)
    # mask the exponent, not the product: a hidden pair never evaluates exp of a large number
    p = tl.exp(tl.where(allowed, scores - b_lse[:, None], float("-inf")))
    dp = tl.dot(b_do, tl.trans(b_v))
    ds = p * (dp - b_delta[:, None])
    return b_dq + tl.dot(ds.to(b_k.dtype), b_k)


@triton.jit
def attention_bwd_dq_kernel(
    q, k, v, d_o, lse, delta, dq, q_start, k_start, window_ptr, sink_ptr,
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
    dq_row = dq + (b64 * TQ * H + i_h) * D
    do_row = d_o + (b64 * TQ * H + i_h) * DV
    k_row = k + (b64 * TK * HKV + i_hkv) * D
    v_row = v + (b64 * TK * HKV + i_hkv) * DV
    stat_row = (b64 * H + i_h) * TQ

    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    valid_m = offs_m < TQ
    mask_q = valid_m[:, None] & (offs_d < D)[None, :]
    b_q = tl.load(q_row + offs_m[:, None] * (H * D) + offs_d[None, :], mask=mask_q, other=0.0)
    b_do = tl.load(do_row + offs_m[:, None] * (H * DV) + offs_d[None, :],
                   mask=valid_m[:, None] & (offs_d < DV)[None, :], other=0.0)
    b_lse = tl.load(lse + stat_row + offs_m, mask=valid_m, other=0.0)
    b_delta = tl.load(delta + stat_row + offs_m, mask=valid_m, other=0.0)
    b_qs = tl.load(q_start + offs_m, mask=valid_m, other=-2)
    q_pos = q_offset + offs_m
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    first_start = tl.load(q_start + m0)
    q_hi = q_offset + tl.minimum(m0 + BM, TQ)
    sink_lo, sink_hi, band_lo, band_hi = key_loops(first_start, q_offset + m0, q_hi, k_offset, TK, window, sink)
    for n0 in range(sink_lo, sink_hi, BN):
        b_dq = _dq_block(b_dq, b_q, b_do, b_lse, b_delta, k_row, v_row, k_start, n0, sink_lo, sink_hi, offs_m,
                         q_pos, b_qs, k_offset, TQ, TK, window, sink, scale, HKV * D, HKV * DV, D, DV, BN, BD)
    for n0 in range(band_lo, band_hi, BN):
        b_dq = _dq_block(b_dq, b_q, b_do, b_lse, b_delta, k_row, v_row, k_start, n0, band_lo, band_hi, offs_m,
                         q_pos, b_qs, k_offset, TQ, TK, window, sink, scale, HKV * D, HKV * DV, D, DV, BN, BD)
    tl.store(dq_row + offs_m[:, None] * (H * D) + offs_d[None, :], b_dq * scale, mask=mask_q)


@triton.jit
def attention_bwd_dkv_kernel(
    q, k, v, d_o, lse, delta, dk_head, dv_head, q_start, k_start, k_end, window_ptr, sink_ptr,
    scale, TQ, TK, q_offset, k_offset, H, HKV, D, DV,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hkv = i_h // (H // HKV)
    n0 = i_n * BN
    window = tl.load(window_ptr + i_h)
    sink = tl.load(sink_ptr + i_h)
    b64 = tl.cast(i_b, tl.int64)
    q_row = q + (b64 * TQ * H + i_h) * D
    do_row = d_o + (b64 * TQ * H + i_h) * DV
    k_row = k + (b64 * TK * HKV + i_hkv) * D
    v_row = v + (b64 * TK * HKV + i_hkv) * DV
    dk_row = dk_head + (b64 * TK * H + i_h) * D
    dv_row = dv_head + (b64 * TK * H + i_h) * DV
    stat_row = (b64 * H + i_h) * TQ

    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    valid_n = offs_n < TK
    mask_k = valid_n[:, None] & (offs_d < D)[None, :]
    mask_v = valid_n[:, None] & (offs_d < DV)[None, :]
    b_k = tl.load(k_row + offs_n[:, None] * (HKV * D) + offs_d[None, :], mask=mask_k, other=0.0)
    b_v = tl.load(v_row + offs_n[:, None] * (HKV * DV) + offs_d[None, :], mask=mask_v, other=0.0)
    b_ks = tl.load(k_start + offs_n, mask=valid_n, other=-1)
    k_pos = k_offset + offs_n
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)

    # Queries that can reach this block: from its first key to the end of its last key's document, and, unless
    # the block holds sink keys (its first key within the sink, or a document starting inside it), within
    # last key + W - 1.
    last = tl.minimum(n0 + BN, TK) - 1
    first_key = k_offset + n0
    last_key = k_offset + last
    last_start = tl.load(k_start + last)
    holds_sink = (sink > 0) & ((first_key - tl.load(k_start + n0) < sink) | (last_start > first_key))
    q_end = tl.load(k_end + last)
    q_end = tl.where(holds_sink, q_end, tl.minimum(q_end, last_key + window))
    q_lo = tl.minimum(tl.maximum(first_key - q_offset, 0), TQ)
    q_hi = tl.minimum(tl.maximum(q_end - q_offset, q_lo), TQ)
    for m0 in range(q_lo, q_hi, BM):
        offs_m = m0 + tl.arange(0, BM)
        valid_m = offs_m < TQ
        b_q = tl.load(q_row + offs_m[:, None] * (H * D) + offs_d[None, :],
                      mask=valid_m[:, None] & (offs_d < D)[None, :], other=0.0)
        b_do = tl.load(do_row + offs_m[:, None] * (H * DV) + offs_d[None, :],
                       mask=valid_m[:, None] & (offs_d < DV)[None, :], other=0.0)
        b_lse = tl.load(lse + stat_row + offs_m, mask=valid_m, other=0.0)
        b_delta = tl.load(delta + stat_row + offs_m, mask=valid_m, other=0.0)
        b_qs = tl.load(q_start + offs_m, mask=valid_m, other=-2)
        q_pos = q_offset + offs_m
        # transposed tiles [keys, queries]: dk and dv accumulate without transposing the accumulators
        scores_t = tl.dot(b_k, tl.trans(b_q)) * scale
        allowed_t = tl.trans(visible(offs_m, offs_n, q_pos, k_pos, b_qs, b_ks, 0, TK, TQ, window, sink))
        p_t = tl.exp(tl.where(allowed_t, scores_t - b_lse[None, :], float("-inf")))
        b_dv += tl.dot(p_t.to(b_do.dtype), b_do)
        dp_t = tl.dot(b_v, tl.trans(b_do))
        ds_t = p_t * (dp_t - b_delta[None, :])
        b_dk += tl.dot(ds_t.to(b_q.dtype), b_q)
    tl.store(dk_row + offs_n[:, None] * (H * D) + offs_d[None, :], b_dk * scale, mask=mask_k)
    tl.store(dv_row + offs_n[:, None] * (H * DV) + offs_d[None, :], b_dv, mask=mask_v)
