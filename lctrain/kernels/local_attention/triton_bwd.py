"""Triton backward kernels of `local_attention` (flash-attention-2 style, banded).

With P the softmax probabilities recomputed from the saved log-sum-exp, dP = dO V^T and
delta_i = sum_d O_id dO_id (computed by the caller):

    dS = P * (dP - delta),   dQ = scale * dS K,   dK = scale * dS^T Q,   dV = P^T dO

1. `local_attention_bwd_dq_kernel`: one program per (query block of one document, head), visiting the same key
   blocks as the forward pass (sink blocks, then band blocks; see `key_ranges`).
2. `local_attention_bwd_dkv_kernel`: one program per (key block of one document, query head). Only queries
   `[n0, n0 + BN - 1 + W)` can reach the block through the window; when the block intersects the sink
   (n0 < S) every later query of the document can. Each query head writes its own fp32 dk/dv
   (`[T_total, H, D]`), which the caller sums over the heads of a GQA group: no atomics, deterministic.

Layouts as in `triton_fwd.py`; do `[T_total, H, Dv]`, delta `[T_total, H]` fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lctrain.kernels.local_attention.triton_fwd import allowed_pairs, key_ranges


@triton.jit
def _dq_key_block(b_dq, b_q, b_do, b_lse, b_delta, k_seq, v_seq, n0, offs_m, length, window, sink, scale,
                  KV_STRIDE_K, KV_STRIDE_V, D, DV,
                  BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    n0_64 = tl.cast(n0, tl.int64)  # key block start: 64-bit scalar times the row stride, 32-bit in the tile
    rows = tl.arange(0, BN)
    offs_n = n0 + rows
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    valid_n = offs_n < length
    b_k = tl.load(k_seq + n0_64 * KV_STRIDE_K + rows[:, None] * KV_STRIDE_K + offs_d[None, :],
                  mask=valid_n[:, None] & (offs_d < D)[None, :], other=0.0)
    b_v = tl.load(v_seq + n0_64 * KV_STRIDE_V + rows[:, None] * KV_STRIDE_V + offs_dv[None, :],
                  mask=valid_n[:, None] & (offs_dv < DV)[None, :], other=0.0)
    scores = tl.dot(b_q, tl.trans(b_k)) * scale
    allowed = allowed_pairs(offs_m, offs_n, length, window, sink)
    # Mask the exponent, not the product: a disallowed pair never evaluates exp of a large number.
    p = tl.exp(tl.where(allowed, scores - b_lse[:, None], float("-inf")))
    dp = tl.dot(b_do, tl.trans(b_v))
    ds = p * (dp - b_delta[:, None])
    return b_dq + tl.dot(ds.to(b_k.dtype), b_k)


@triton.jit
def local_attention_bwd_dq_kernel(
    q, k, v, d_o, lse, delta, dq, window_ptr, sink_ptr, cu_seqlens, tiles,
    scale, H, HKV, D, DV,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    # grid (tile-table row, head) and 64-bit addressing as in the forward kernel
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    i_n = tl.load(tiles + 2 * i_t)
    m0 = tl.load(tiles + 2 * i_t + 1) * BM
    i_hkv = i_h // (H // HKV)
    bos = tl.load(cu_seqlens + i_n)
    length = tl.load(cu_seqlens + i_n + 1) - bos
    window = tl.load(window_ptr + i_h)
    sink = tl.load(sink_ptr + i_h)
    bos64 = tl.cast(bos, tl.int64)
    row_blk = (bos64 + tl.cast(m0, tl.int64)) * H + i_h  # first query row of the block
    q_blk = q + row_blk * D
    dq_blk = dq + row_blk * D
    do_blk = d_o + row_blk * DV
    k_seq = k + (bos64 * HKV + i_hkv) * D
    v_seq = v + (bos64 * HKV + i_hkv) * DV

    rows = tl.arange(0, BM)
    offs_m = m0 + rows
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    valid_m = offs_m < length
    mask_qd = valid_m[:, None] & (offs_d < D)[None, :]
    b_q = tl.load(q_blk + rows[:, None] * (H * D) + offs_d[None, :], mask=mask_qd, other=0.0)
    b_do = tl.load(do_blk + rows[:, None] * (H * DV) + offs_dv[None, :],
                   mask=valid_m[:, None] & (offs_dv < DV)[None, :], other=0.0)
    b_lse = tl.load(lse + row_blk + rows * H, mask=valid_m, other=0.0)
    b_delta = tl.load(delta + row_blk + rows * H, mask=valid_m, other=0.0)
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    sink_end, band_start, band_end = key_ranges(m0, window, sink, BM, BN, length)
    for n0 in range(0, sink_end, BN):
        b_dq = _dq_key_block(b_dq, b_q, b_do, b_lse, b_delta, k_seq, v_seq, n0, offs_m, length, window, sink,
                             scale, HKV * D, HKV * DV, D, DV, BN, BD, BDV)
    for n0 in range(band_start, band_end, BN):
        b_dq = _dq_key_block(b_dq, b_q, b_do, b_lse, b_delta, k_seq, v_seq, n0, offs_m, length, window, sink,
                             scale, HKV * D, HKV * DV, D, DV, BN, BD, BDV)
    tl.store(dq_blk + rows[:, None] * (H * D) + offs_d[None, :], b_dq * scale, mask=mask_qd)


@triton.jit
def local_attention_bwd_dkv_kernel(
    q, k, v, d_o, lse, delta, dk_head, dv_head, window_ptr, sink_ptr, cu_seqlens, tiles,
    scale, H, HKV, D, DV,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    # grid (tile-table row: document, key block; head) and 64-bit addressing as in the forward kernel
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    i_n = tl.load(tiles + 2 * i_t)
    n0 = tl.load(tiles + 2 * i_t + 1) * BN
    i_hkv = i_h // (H // HKV)
    bos = tl.load(cu_seqlens + i_n)
    length = tl.load(cu_seqlens + i_n + 1) - bos
    window = tl.load(window_ptr + i_h)
    sink = tl.load(sink_ptr + i_h)
    bos64 = tl.cast(bos, tl.int64)
    n0_64 = tl.cast(n0, tl.int64)
    q_seq = q + (bos64 * H + i_h) * D
    do_seq = d_o + (bos64 * H + i_h) * DV
    row_seq = bos64 * H + i_h
    k_blk = k + ((bos64 + n0_64) * HKV + i_hkv) * D
    v_blk = v + ((bos64 + n0_64) * HKV + i_hkv) * DV
    dk_blk = dk_head + ((bos64 + n0_64) * H + i_h) * D
    dv_blk = dv_head + ((bos64 + n0_64) * H + i_h) * DV

    rows_n = tl.arange(0, BN)
    offs_n = n0 + rows_n
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    valid_n = offs_n < length
    mask_kd = valid_n[:, None] & (offs_d < D)[None, :]
    mask_vd = valid_n[:, None] & (offs_dv < DV)[None, :]
    b_k = tl.load(k_blk + rows_n[:, None] * (HKV * D) + offs_d[None, :], mask=mask_kd, other=0.0)
    b_v = tl.load(v_blk + rows_n[:, None] * (HKV * DV) + offs_dv[None, :], mask=mask_vd, other=0.0)
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BDV], dtype=tl.float32)

    # Queries that can reach this key block: through the window up to the last key + W - 1, or all of them
    # when the block holds sink keys.
    q_start = n0 // BM * BM
    q_end = tl.where(n0 < sink, length, tl.minimum(length, n0 + BN - 1 + window))
    for m0 in range(q_start, q_end, BM):
        m0_64 = tl.cast(m0, tl.int64)  # query block start: 64-bit scalar times the row stride, 32-bit in the tile
        rows = tl.arange(0, BM)
        offs_m = m0 + rows
        valid_m = offs_m < length
        b_q = tl.load(q_seq + m0_64 * (H * D) + rows[:, None] * (H * D) + offs_d[None, :],
                      mask=valid_m[:, None] & (offs_d < D)[None, :], other=0.0)
        b_do = tl.load(do_seq + m0_64 * (H * DV) + rows[:, None] * (H * DV) + offs_dv[None, :],
                       mask=valid_m[:, None] & (offs_dv < DV)[None, :], other=0.0)
        b_lse = tl.load(lse + row_seq + m0_64 * H + rows * H, mask=valid_m, other=0.0)
        b_delta = tl.load(delta + row_seq + m0_64 * H + rows * H, mask=valid_m, other=0.0)
        # Transposed tiles [keys, queries], so dk and dv accumulate without transposing the accumulators.
        scores_t = tl.dot(b_k, tl.trans(b_q)) * scale
        allowed_t = tl.trans(allowed_pairs(offs_m, offs_n, length, window, sink))
        p_t = tl.exp(tl.where(allowed_t, scores_t - b_lse[None, :], float("-inf")))
        b_dv += tl.dot(p_t.to(b_do.dtype), b_do)
        dp_t = tl.dot(b_v, tl.trans(b_do))
        ds_t = p_t * (dp_t - b_delta[None, :])
        b_dk += tl.dot(ds_t.to(b_q.dtype), b_q)
    tl.store(dk_blk + rows_n[:, None] * (H * D) + offs_d[None, :], b_dk * scale, mask=mask_kd)
    tl.store(dv_blk + rows_n[:, None] * (H * DV) + offs_dv[None, :], b_dv, mask=mask_vd)
