"""Triton forward kernel of `linear_attention` (Lightning-Attention-2 chunked form).

One program per (sequence * head, key block * value block) walks its own token range
`[cu_seqlens[n], cu_seqlens[n+1])` chunk by chunk, keeping its `[BK, BV]` state slice in fp32 registers.
Packed documents need no padding copy, and the sequence length is a runtime value, so a new length never
recompiles the kernel. The recurrence is linear in the key dim, so each key block produces an exact partial
output; the caller sums `o_part` over its first axis.

All tensors are contiguous: q, k `[T_total, H, K]`, v `[T_total, H, V]`, g `[T_total, H]` fp32,
o_part `[NK, T_total, H, V]` fp32, states `[N, H, K, V]` fp32, cu_seqlens int32 `[N+1]`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lctrain.kernels.addressing import split_row


@triton.jit
def linear_attention_fwd_kernel(
    q, k, v, g, initial_state, o_part, final_state, cu_seqlens,
    scale, total_tokens, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # documents x heads on grid axis 0 (up to 2^31 - 1 programs; axes 1-2 stop at 65,535), key x value blocks
    # on axis 1
    i_nh = tl.program_id(0)
    i_n = i_nh // H
    i_h = i_nh % H
    num_v_blocks = tl.cdiv(V, BV)
    i_k = tl.program_id(1) // num_v_blocks
    i_v = tl.program_id(1) % num_v_blocks
    bos = tl.load(cu_seqlens + i_n)
    length = tl.load(cu_seqlens + i_n + 1) - bos
    # 64-bit base pointers for this (sequence, head), advanced by a 64-bit scalar per chunk: token * row stride
    # passes 2^31 in one long document. Offsets inside a chunk tile stay 32-bit (they cost registers).
    row0 = tl.cast(bos, tl.int64) * H + i_h
    q_seq = q + row0 * K
    k_seq = k + row0 * K
    v_seq = v + row0 * V
    o_seq = o_part + (tl.cast(i_k, tl.int64) * total_tokens * H + row0) * V
    g_seq = g + row0

    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    causal = offs_t[:, None] >= offs_t[None, :]
    state_seq = tl.cast(i_nh, tl.int64) * K * V
    state_offs = offs_k[:, None] * V + offs_v[None, :]
    mask_state = mask_k[:, None] & mask_v[None, :]
    state = tl.load(initial_state + state_seq + state_offs, mask=mask_state, other=0.0).to(tl.float32)

    for i_c in range(0, tl.cdiv(length, BT)):
        t0, t_low = split_row(i_c * BT)  # 64-bit high part, 32-bit low part of the first token
        rows = t_low + offs_t
        valid = i_c * BT + offs_t < length
        # Rows past the end (and columns past K, V) read as zero: they add nothing to the state and
        # leave the decay unchanged.
        b_q = tl.load(q_seq + t0 * (H * K) + rows[:, None] * (H * K) + offs_k[None, :],
                      mask=valid[:, None] & mask_k[None, :], other=0.0)
        b_k = tl.load(k_seq + t0 * (H * K) + rows[:, None] * (H * K) + offs_k[None, :],
                      mask=valid[:, None] & mask_k[None, :], other=0.0)
        b_v = tl.load(v_seq + t0 * (H * V) + rows[:, None] * (H * V) + offs_v[None, :],
                      mask=valid[:, None] & mask_v[None, :], other=0.0)
        b_g = tl.load(g_seq + t0 * H + rows * H, mask=valid, other=0.0).to(tl.float32)
        cum = tl.cumsum(b_g, axis=0)  # b_i: inclusive chunk-local log-decay
        total = tl.sum(b_g, axis=0)  # b_C

        # Intra-chunk: (q k^T) * exp(b_i - b_j) on the causal triangle; the exponent is masked first so
        # the upper triangle never evaluates exp of a positive number.
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
        scores = tl.dot(b_q, tl.trans(b_k)) * decay
        b_o = tl.dot(scores.to(b_v.dtype), b_v)
        # Inter-chunk: exp(b_i) q_i^T S_entering.
        q_from_start = (b_q * tl.exp(cum)[:, None]).to(b_q.dtype)
        b_o += tl.dot(q_from_start, state.to(b_q.dtype))
        tl.store(o_seq + t0 * (H * V) + rows[:, None] * (H * V) + offs_v[None, :], b_o * scale,
                 mask=valid[:, None] & mask_v[None, :])

        # Hand-off: S <- exp(b_C) S + sum_j exp(b_C - b_j) k_j v_j^T.
        k_to_end = (b_k * tl.exp(total - cum)[:, None]).to(b_k.dtype)
        state = state * tl.exp(total) + tl.dot(tl.trans(k_to_end), b_v)

    tl.store(final_state + state_seq + state_offs, state, mask=mask_state)
