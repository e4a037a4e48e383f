"""Triton backward kernels of `landmark_attention`.

For query i with group log-sum-exp M(i) (saved by the forward pass), delta_i = dO_i . O_i (computed by the
caller) and dp_ij = dO_i . v_j, the forward weights are

    own block:       p_ij = exp(s_ij - M(i))
    earlier block c: w_ij = g_c(i) pi_ij,  g_c(i) = exp(s_{i, landmark(c)} - M(i)),  pi_ij = exp(s_ij - L_c(i)),

and with a_c(i) = sum_{j in c} pi_ij dp_ij (= dO_i . A_c(i)) the score gradients are

    own block:       ds_ij = p_ij (dp_ij - delta_i)
    landmark of c:   ds_ij = g_c(i) (a_c(i) - delta_i)                     (the gate softmax)
    member j of c:   ds_ij = w_ij (dp_ij - a_c(i))                          (the block's inner softmax)

so dQ = scale dS K, dK = scale dS^T Q and dV = W^T dO. L_c(i) and a_c(i) are row statistics of one block's tile,
recomputed wherever that tile is loaded.

1. `landmark_bwd_dq_kernel`: one program per (query tile of one document, head), the forward pass's loop.
2. `landmark_bwd_dkv_kernel`: one program per (key block of one document, head): its own block's queries, then every
   query of every later block. Each program owns its block's dk/dv rows: no atomics, deterministic.

Layouts as in `triton_fwd.py`; do `[T_total, H, DV]`, delta `[T_total, H]` fp32, dq/dk/dv fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lctrain.kernels.landmark_attention.triton_fwd import load_rows, query_tile


@triton.jit
def landmark_bwd_dq_kernel(
    q, k, v, d_o, lse, delta, dq, cu_seqlens, tiles,
    scale, H, BLOCK,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
):
    # grid (tile-table row, head) and 64-bit addressing as in the forward kernel
    i_h = tl.program_id(1)
    i_n = tl.load(tiles + 2 * tl.program_id(0))
    bos = tl.load(cu_seqlens + i_n)
    length = tl.load(cu_seqlens + i_n + 1) - bos
    b, start, rows, offs_m, valid_m = query_tile(tl.load(tiles + 2 * tl.program_id(0) + 1), BLOCK, length, BM)
    if start >= length:
        return
    bos64 = tl.cast(bos, tl.int64)
    q_seq = q + (bos64 * H + i_h) * D
    k_seq = k + (bos64 * H + i_h) * D
    v_seq = v + (bos64 * H + i_h) * DV
    do_seq = d_o + (bos64 * H + i_h) * DV
    row_tile = (bos64 + tl.cast(start, tl.int64)) * H + i_h  # the query tile's first row
    tile_m = tl.arange(0, BM)

    cols = tl.arange(0, BN)
    member = cols < BLOCK - 1
    is_landmark = cols == BLOCK - 1
    b_q = load_rows(q_seq, start, tile_m, valid_m, H * D, D)
    b_do = load_rows(do_seq, start, tile_m, valid_m, H * DV, DV)
    b_lse = tl.load(lse + row_tile + tile_m * H, mask=valid_m, other=0.0)
    b_delta = tl.load(delta + row_tile + tile_m * H, mask=valid_m, other=0.0)
    b_dq = tl.zeros([BM, D], dtype=tl.float32)
    for block_start in range(0, b * BLOCK, BLOCK):  # load masks and loop step as in the forward pass
        offs_n = block_start + cols
        b_k = load_rows(k_seq, block_start, cols, (cols < BLOCK) & (offs_n < length), H * D, D)
        b_v = load_rows(v_seq, block_start, cols, member & (offs_n < length), H * DV, DV)
        scores = tl.dot(b_q, tl.trans(b_k)) * scale
        gate = tl.exp(tl.sum(tl.where(is_landmark[None, :], scores, 0.0), axis=1) - b_lse)
        inner = tl.where(member[None, :], scores, float("-inf"))
        p = tl.exp(inner - tl.max(inner, axis=1)[:, None])
        p = tl.fdiv(p, tl.sum(p, axis=1)[:, None])  # pi_ij, zero off the members (division as in the forward)
        dp = tl.dot(b_do, tl.trans(b_v))
        average_dp = tl.sum(p * dp, axis=1)  # a_c(i)
        ds = gate[:, None] * p * (dp - average_dp[:, None])
        ds += tl.where(is_landmark[None, :], (gate * (average_dp - b_delta))[:, None], 0.0)
        b_dq += tl.dot(ds.to(b_k.dtype), b_k)
    offs_n = b * BLOCK + cols
    b_k = load_rows(k_seq, b * BLOCK, cols, (cols < BLOCK) & (offs_n < length), H * D, D)
    b_v = load_rows(v_seq, b * BLOCK, cols, member & (offs_n < length), H * DV, DV)
    scores = tl.dot(b_q, tl.trans(b_k)) * scale
    own = (cols[None, :] <= rows[:, None]) & member[None, :]
    # Mask the exponent, not the product: a hidden pair never evaluates exp of a large number.
    p = tl.exp(tl.where(own, scores - b_lse[:, None], float("-inf")))
    dp = tl.dot(b_do, tl.trans(b_v))
    ds = p * (dp - b_delta[:, None])
    b_dq += tl.dot(ds.to(b_k.dtype), b_k)
    tl.store(dq + row_tile * D + tile_m[:, None] * (H * D) + tl.arange(0, D)[None, :], b_dq * scale,
             mask=valid_m[:, None])


@triton.jit
def landmark_bwd_dkv_kernel(
    q, k, v, d_o, lse, delta, dk, dv, cu_seqlens, tiles,
    scale, H, BLOCK,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
):
    # grid (tile-table row: document, block c within it; head) and 64-bit addressing as in the forward kernel
    i_h = tl.program_id(1)
    i_n = tl.load(tiles + 2 * tl.program_id(0))
    c = tl.load(tiles + 2 * tl.program_id(0) + 1)
    bos = tl.load(cu_seqlens + i_n)
    length = tl.load(cu_seqlens + i_n + 1) - bos
    bos64 = tl.cast(bos, tl.int64)
    q_seq = q + (bos64 * H + i_h) * D
    k_seq = k + (bos64 * H + i_h) * D
    v_seq = v + (bos64 * H + i_h) * DV
    do_seq = d_o + (bos64 * H + i_h) * DV
    row_seq = bos64 * H + i_h
    row_blk = (bos64 + tl.cast(c * BLOCK, tl.int64)) * H + i_h  # the block's first row

    cols = tl.arange(0, BN)
    member = cols < BLOCK - 1
    is_landmark = cols == BLOCK - 1
    offs_n = c * BLOCK + cols
    valid_n = (cols < BLOCK) & (offs_n < length)
    b_k = load_rows(k_seq, c * BLOCK, cols, valid_n, H * D, D)
    b_v = load_rows(v_seq, c * BLOCK, cols, member & valid_n, H * DV, DV)
    b_dk = tl.zeros([BN, D], dtype=tl.float32)
    b_dv = tl.zeros([BN, DV], dtype=tl.float32)
    tiles = tl.cdiv(BLOCK, BM)
    # Score tiles are [queries, keys] as in the other kernels; the accumulations take their transposes as the
    # small left operand, so the block's key and value tiles are only ever right operands (shared memory).
    for first_row in range(0, BLOCK, BM):  # queries of this block: ordinary causal softmax
        rows = first_row + tl.arange(0, BM)
        offs_m = c * BLOCK + rows
        valid_m = (rows < BLOCK) & (offs_m < length)
        b_q = load_rows(q_seq, c * BLOCK, rows, valid_m, H * D, D)
        b_do = load_rows(do_seq, c * BLOCK, rows, valid_m, H * DV, DV)
        b_lse = tl.load(lse + row_blk + rows * H, mask=valid_m, other=0.0)
        b_delta = tl.load(delta + row_blk + rows * H, mask=valid_m, other=0.0)
        scores = tl.dot(b_q, tl.trans(b_k)) * scale
        own = (cols[None, :] <= rows[:, None]) & member[None, :] & valid_m[:, None]
        p = tl.exp(tl.where(own, scores - b_lse[:, None], float("-inf")))
        b_dv += tl.dot(tl.trans(p.to(b_do.dtype)), b_do)
        dp = tl.dot(b_do, tl.trans(b_v))
        ds = p * (dp - b_delta[:, None])
        b_dk += tl.dot(tl.trans(ds.to(b_q.dtype)), b_q)
    for tile_start in range((c + 1) * tiles * BM, tl.cdiv(length, BLOCK) * tiles * BM, BM):
        # Queries of later blocks (gate and inner softmax). The loop runs over query tiles, scaled by BM so
        # that its step is not 1 (see the forward pass).
        _, start, _, _, valid_m = query_tile(tile_start // BM, BLOCK, length, BM)
        tile_m = tl.arange(0, BM)
        b_q = load_rows(q_seq, start, tile_m, valid_m, H * D, D)
        b_do = load_rows(do_seq, start, tile_m, valid_m, H * DV, DV)
        start64 = tl.cast(start, tl.int64)
        b_lse = tl.load(lse + row_seq + start64 * H + tile_m * H, mask=valid_m, other=0.0)
        b_delta = tl.load(delta + row_seq + start64 * H + tile_m * H, mask=valid_m, other=0.0)
        scores = tl.dot(b_q, tl.trans(b_k)) * scale
        gate = tl.exp(tl.sum(tl.where(is_landmark[None, :], scores, 0.0), axis=1) - b_lse)
        gate = tl.where(valid_m, gate, 0.0)
        inner = tl.where(member[None, :], scores, float("-inf"))
        p = tl.exp(inner - tl.max(inner, axis=1)[:, None])
        p = tl.fdiv(p, tl.sum(p, axis=1)[:, None])
        weights = gate[:, None] * p
        b_dv += tl.dot(tl.trans(weights.to(b_do.dtype)), b_do)
        dp = tl.dot(b_do, tl.trans(b_v))
        average_dp = tl.sum(p * dp, axis=1)
        ds = weights * (dp - average_dp[:, None])
        ds += tl.where(is_landmark[None, :], (gate * (average_dp - b_delta))[:, None], 0.0)
        b_dk += tl.dot(tl.trans(ds.to(b_q.dtype)), b_q)
    tl.store(dk + row_blk * D + cols[:, None] * (H * D) + tl.arange(0, D)[None, :], b_dk * scale,
             mask=valid_n[:, None])
    tl.store(dv + row_blk * DV + cols[:, None] * (H * DV) + tl.arange(0, DV)[None, :], b_dv, mask=valid_n[:, None])
