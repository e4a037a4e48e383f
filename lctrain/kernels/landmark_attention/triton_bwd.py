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

1. `landmark_bwd_dq_kernel`: one program per (query tile, sequence * head), the forward pass's loop.
2. `landmark_bwd_dkv_kernel`: one program per (key block, sequence * head): its own block's queries, then every
   query of every later block. Each program owns its block's dk/dv rows: no atomics, deterministic.

Layouts as in `triton_fwd.py`; do `[T_total, H, DV]`, delta `[T_total, H]` fp32, dq/dk/dv fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lctrain.kernels.landmark_attention.triton_fwd import load_rows, query_tile


@triton.jit
def landmark_bwd_dq_kernel(
    q, k, v, d_o, lse, delta, dq, cu_seqlens,
    scale, H, BLOCK,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu_seqlens + i_n)
    length = tl.load(cu_seqlens + i_n + 1) - bos
    b, start, rows, offs_m, valid_m = query_tile(i_t, BLOCK, length, BM)
    if start >= length:
        return
    bos64 = tl.cast(bos, tl.int64)
    q_seq = q + (bos64 * H + i_h) * D
    k_seq = k + (bos64 * H + i_h) * D
    v_seq = v + (bos64 * H + i_h) * DV
    do_seq = d_o + (bos64 * H + i_h) * DV
    dq_seq = dq + (bos64 * H + i_h) * D
    row_seq = bos64 * H + i_h

    cols = tl.arange(0, BN)
    member = cols < BLOCK - 1
    is_landmark = cols == BLOCK - 1
    b_q = load_rows(q_seq, offs_m, valid_m, H * D, D)
    b_do = load_rows(do_seq, offs_m, valid_m, H * DV, DV)
    b_lse = tl.load(lse + row_seq + offs_m * H, mask=valid_m, other=0.0)
    b_delta = tl.load(delta + row_seq + offs_m * H, mask=valid_m, other=0.0)
    b_dq = tl.zeros([BM, D], dtype=tl.float32)
    for block_start in range(0, b * BLOCK, BLOCK):  # load masks and loop step as in the forward pass
        offs_n = block_start + cols
        b_k = load_rows(k_seq, offs_n, (cols < BLOCK) & (offs_n < length), H * D, D)
        b_v = load_rows(v_seq, offs_n, member & (offs_n < length), H * DV, DV)
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
    b_k = load_rows(k_seq, offs_n, (cols < BLOCK) & (offs_n < length), H * D, D)
    b_v = load_rows(v_seq, offs_n, member & (offs_n < length), H * DV, DV)
    scores = tl.dot(b_q, tl.trans(b_k)) * scale
    own = (cols[None, :] <= rows[:, None]) & member[None, :]
    # Mask the exponent, not the product: a hidden pair never evaluates exp of a large number.
    p = tl.exp(tl.where(own, scores - b_lse[:, None], float("-inf")))
    dp = tl.dot(b_do, tl.trans(b_v))
    ds = p * (dp - b_delta[:, None])
    b_dq += tl.dot(ds.to(b_k.dtype), b_k)
    tl.store(dq_seq + offs_m[:, None] * (H * D) + tl.arange(0, D)[None, :], b_dq * scale, mask=valid_m[:, None])


@triton.jit
def landmark_bwd_dkv_kernel(
    q, k, v, d_o, lse, delta, dk, dv, cu_seqlens,
    scale, H, BLOCK,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
):
    c = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu_seqlens + i_n)
    length = tl.load(cu_seqlens + i_n + 1) - bos
    if c * BLOCK >= length:
        return
    bos64 = tl.cast(bos, tl.int64)
    q_seq = q + (bos64 * H + i_h) * D
    k_seq = k + (bos64 * H + i_h) * D
    v_seq = v + (bos64 * H + i_h) * DV
    do_seq = d_o + (bos64 * H + i_h) * DV
    dk_seq = dk + (bos64 * H + i_h) * D
    dv_seq = dv + (bos64 * H + i_h) * DV
    row_seq = bos64 * H + i_h

    cols = tl.arange(0, BN)
    member = cols < BLOCK - 1
    is_landmark = cols == BLOCK - 1
    offs_n = c * BLOCK + cols
    valid_n = (cols < BLOCK) & (offs_n < length)
    b_k = load_rows(k_seq, offs_n, valid_n, H * D, D)
    b_v = load_rows(v_seq, offs_n, member & valid_n, H * DV, DV)
    b_dk = tl.zeros([BN, D], dtype=tl.float32)
    b_dv = tl.zeros([BN, DV], dtype=tl.float32)
    tiles = tl.cdiv(BLOCK, BM)
    # Score tiles are [queries, keys] as in the other kernels; the accumulations take their transposes as the
    # small left operand, so the block's key and value tiles are only ever right operands (shared memory).
    for first_row in range(0, BLOCK, BM):  # queries of this block: ordinary causal softmax
        rows = first_row + tl.arange(0, BM)
        offs_m = c * BLOCK + rows
        valid_m = (rows < BLOCK) & (offs_m < length)
        b_q = load_rows(q_seq, offs_m, valid_m, H * D, D)
        b_do = load_rows(do_seq, offs_m, valid_m, H * DV, DV)
        b_lse = tl.load(lse + row_seq + offs_m * H, mask=valid_m, other=0.0)
        b_delta = tl.load(delta + row_seq + offs_m * H, mask=valid_m, other=0.0)
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
        _, _, _, offs_m, valid_m = query_tile(tile_start // BM, BLOCK, length, BM)
        b_q = load_rows(q_seq, offs_m, valid_m, H * D, D)
        b_do = load_rows(do_seq, offs_m, valid_m, H * DV, DV)
        b_lse = tl.load(lse + row_seq + offs_m * H, mask=valid_m, other=0.0)
        b_delta = tl.load(delta + row_seq + offs_m * H, mask=valid_m, other=0.0)
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
    tl.store(dk_seq + offs_n[:, None] * (H * D) + tl.arange(0, D)[None, :], b_dk * scale, mask=valid_n[:, None])
    tl.store(dv_seq + offs_n[:, None] * (H * DV) + tl.arange(0, DV)[None, :], b_dv, mask=valid_n[:, None])
