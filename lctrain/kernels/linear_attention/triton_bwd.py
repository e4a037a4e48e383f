"""Triton backward kernels of `linear_attention`.

Two kernels, each one program per (sequence * head, key block * value block) walking its token range (chunk-local
inclusive cumulative log-gates b_i, chunk length C, scale s); they are separate launches so each keeps fewer
tiles live in registers:

1. `linear_attention_bwd_dq_kernel`, forward in time, recomputing the entering state S_0 of each chunk:
       dq_i = s * [ sum_{j<=i} exp(b_i - b_j) (do_i . v_j) k_j  +  exp(b_i) S_0 do_i ]
2. `linear_attention_bwd_dkv_kernel`, backward in time, carrying R = dL/dS at the end of the chunk (starting
   from the final-state gradient):
       dk_j = s * sum_{i>=j} exp(b_i - b_j) (do_i . v_j) q_i  +  exp(b_C - b_j) R v_j
       dv_j = s * sum_{i>=j} exp(b_i - b_j) (q_i . k_j) do_i  +  exp(b_C - b_j) R^T k_j
       R   <- exp(b_C) R + s * sum_i exp(b_i) q_i do_i^T
   and R after the first chunk is d(initial_state).
dq and dk sum over value columns and dv over key columns, so each block writes fp32 partials
(`[NV, T_total, H, K]` for dq and dk, `[NK, T_total, H, V]` for dv) that the caller sums.

`linear_attention_dlog_decay_kernel`, one program per sequence * head: with B_t the cumulative log-decay,
q_t enters as exp(B_t) q_t and k_t as exp(-B_t) k_t, so dL/dB_t = q_t . dq_t - k_t . dk_t (plus <dS_T, S_T> at
the last token from the final state), and dL/dg_t = sum_{s>=t} dL/dB_s: a reverse cumulative sum within the
sequence, walked chunk by chunk from the end with a running carry.

Layouts as in `triton_fwd.py`; do `[T_total, H, V]` in the input dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lctrain.kernels.addressing import split_row


@triton.jit
def linear_attention_bwd_dq_kernel(
    q, k, v, g, initial_state, d_o, dq_part, cu_seqlens,
    scale, total_tokens, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # grid and 64-bit addressing as in the forward kernel
    i_nh = tl.program_id(0)
    i_n = i_nh // H
    i_h = i_nh % H
    num_v_blocks = tl.cdiv(V, BV)
    i_k = tl.program_id(1) // num_v_blocks
    i_v = tl.program_id(1) % num_v_blocks
    bos = tl.load(cu_seqlens + i_n)
    length = tl.load(cu_seqlens + i_n + 1) - bos
    num_chunks = tl.cdiv(length, BT)
    row0 = tl.cast(bos, tl.int64) * H + i_h
    q_seq = q + row0 * K
    k_seq = k + row0 * K
    v_seq = v + row0 * V
    do_seq = d_o + row0 * V
    g_seq = g + row0
    part_row0 = tl.cast(i_v, tl.int64) * total_tokens * H + row0
    dq_seq = dq_part + part_row0 * K

    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_state = mask_k[:, None] & mask_v[None, :]
    causal = offs_t[:, None] >= offs_t[None, :]
    state_seq = tl.cast(i_nh, tl.int64) * K * V
    state_offs = state_seq + offs_k[:, None] * V + offs_v[None, :]

    # dq, recomputing the entering state of each chunk forward in time.
    state = tl.load(initial_state + state_offs, mask=mask_state, other=0.0).to(tl.float32)
    for i_c in range(0, num_chunks):
        t0, t_low = split_row(i_c * BT)  # 64-bit high part, 32-bit low part of the first token
        rows = t_low + offs_t
        valid = i_c * BT + offs_t < length
        mask_tk = valid[:, None] & mask_k[None, :]
        mask_tv = valid[:, None] & mask_v[None, :]
        b_k = tl.load(k_seq + t0 * (H * K) + rows[:, None] * (H * K) + offs_k[None, :], mask=mask_tk, other=0.0)
        b_v = tl.load(v_seq + t0 * (H * V) + rows[:, None] * (H * V) + offs_v[None, :], mask=mask_tv, other=0.0)
        b_do = tl.load(do_seq + t0 * (H * V) + rows[:, None] * (H * V) + offs_v[None, :], mask=mask_tv,
                       other=0.0)
        b_g = tl.load(g_seq + t0 * H + rows * H, mask=valid, other=0.0).to(tl.float32)
        cum = tl.cumsum(b_g, axis=0)
        total = tl.sum(b_g, axis=0)
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))

        do_v = tl.dot(b_do, tl.trans(b_v)) * decay  # [i, j] = (do_i . v_j) decay
        b_dq = tl.dot(do_v.to(b_k.dtype), b_k)
        b_dq += tl.dot(b_do, tl.trans(state.to(b_do.dtype))) * tl.exp(cum)[:, None]
        tl.store(dq_seq + t0 * (H * K) + rows[:, None] * (H * K) + offs_k[None, :], b_dq * scale, mask=mask_tk)

        k_to_end = (b_k * tl.exp(total - cum)[:, None]).to(b_k.dtype)
        state = state * tl.exp(total) + tl.dot(tl.trans(k_to_end), b_v)


@triton.jit
def linear_attention_bwd_dkv_kernel(
    q, k, v, g, d_o, d_final_state, dk_part, dv_part, d_initial_state, cu_seqlens,
    scale, total_tokens, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # grid and 64-bit addressing as in the forward kernel
    i_nh = tl.program_id(0)
    i_n = i_nh // H
    i_h = i_nh % H
    num_v_blocks = tl.cdiv(V, BV)
    i_k = tl.program_id(1) // num_v_blocks
    i_v = tl.program_id(1) % num_v_blocks
    bos = tl.load(cu_seqlens + i_n)
    length = tl.load(cu_seqlens + i_n + 1) - bos
    num_chunks = tl.cdiv(length, BT)
    row0 = tl.cast(bos, tl.int64) * H + i_h
    q_seq = q + row0 * K
    k_seq = k + row0 * K
    v_seq = v + row0 * V
    do_seq = d_o + row0 * V
    dv_seq = dv_part + (tl.cast(i_k, tl.int64) * total_tokens * H + row0) * V
    g_seq = g + row0
    part_row0 = tl.cast(i_v, tl.int64) * total_tokens * H + row0
    dk_seq = dk_part + part_row0 * K

    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_state = mask_k[:, None] & mask_v[None, :]
    causal = offs_t[:, None] >= offs_t[None, :]
    state_seq = tl.cast(i_nh, tl.int64) * K * V
    state_offs = state_seq + offs_k[:, None] * V + offs_v[None, :]

    # dk, dv and d(initial_state), carrying dL/dS backward in time.
    d_state = tl.load(d_final_state + state_offs, mask=mask_state, other=0.0).to(tl.float32)
    for i_rev in range(0, num_chunks):
        i_c = num_chunks - 1 - i_rev
        t0, t_low = split_row(i_c * BT)  # 64-bit high part, 32-bit low part of the first token
        rows = t_low + offs_t
        valid = i_c * BT + offs_t < length
        mask_tk = valid[:, None] & mask_k[None, :]
        mask_tv = valid[:, None] & mask_v[None, :]
        b_q = tl.load(q_seq + t0 * (H * K) + rows[:, None] * (H * K) + offs_k[None, :], mask=mask_tk, other=0.0)
        b_k = tl.load(k_seq + t0 * (H * K) + rows[:, None] * (H * K) + offs_k[None, :], mask=mask_tk, other=0.0)
        b_v = tl.load(v_seq + t0 * (H * V) + rows[:, None] * (H * V) + offs_v[None, :], mask=mask_tv, other=0.0)
        b_do = tl.load(do_seq + t0 * (H * V) + rows[:, None] * (H * V) + offs_v[None, :], mask=mask_tv,
                       other=0.0)
        b_g = tl.load(g_seq + t0 * H + rows * H, mask=valid, other=0.0).to(tl.float32)
        cum = tl.cumsum(b_g, axis=0)
        total = tl.sum(b_g, axis=0)
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
        to_end = tl.exp(total - cum)[:, None]  # exp(b_C - b_j)

        scores = tl.dot(b_q, tl.trans(b_k)) * decay  # [i, j]
        do_v = tl.dot(b_do, tl.trans(b_v)) * decay  # [i, j]
        b_dk = tl.dot(tl.trans(do_v).to(b_q.dtype), b_q) * scale
        b_dk += tl.dot(b_v, tl.trans(d_state.to(b_v.dtype))) * to_end
        b_dv = tl.dot(tl.trans(scores).to(b_do.dtype), b_do) * scale
        b_dv += tl.dot(b_k, d_state.to(b_k.dtype)) * to_end
        tl.store(dk_seq + t0 * (H * K) + rows[:, None] * (H * K) + offs_k[None, :], b_dk, mask=mask_tk)
        tl.store(dv_seq + t0 * (H * V) + rows[:, None] * (H * V) + offs_v[None, :], b_dv, mask=mask_tv)

        q_from_start = (b_q * tl.exp(cum)[:, None]).to(b_q.dtype)
        d_state = d_state * tl.exp(total) + tl.dot(tl.trans(q_from_start), b_do) * scale

    tl.store(d_initial_state + state_offs, d_state, mask=mask_state)


@triton.jit
def linear_attention_dlog_decay_kernel(
    q, k, dq, dk, final_term, dg, cu_seqlens,
    H, K,
    BT: tl.constexpr, BK: tl.constexpr,
):
    """dg `[T_total, H]` fp32 from q, k (input dtype), dq, dk (fp32 `[T_total, H, K]`) and final_term
    `[N, H]` fp32 = <dS_final, S_final> per sequence and head."""
    i_nh = tl.program_id(0)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu_seqlens + i_n)
    length = tl.load(cu_seqlens + i_n + 1) - bos
    num_chunks = tl.cdiv(length, BT)
    row0 = tl.cast(bos, tl.int64) * H + i_h
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    mask_k = offs_k < K

    carry = tl.load(final_term + i_nh).to(tl.float32)
    for i_rev in range(0, num_chunks):
        i_c = num_chunks - 1 - i_rev
        t0, t_low = split_row(i_c * BT)  # 64-bit high part, 32-bit low part of the first token
        rows = t_low + offs_t
        row = row0 + t0 * H
        valid = i_c * BT + offs_t < length
        offs = rows[:, None] * (H * K) + offs_k[None, :]
        mask = valid[:, None] & mask_k[None, :]
        b_q = tl.load(q + row * K + offs, mask=mask, other=0.0).to(tl.float32)
        b_k = tl.load(k + row * K + offs, mask=mask, other=0.0).to(tl.float32)
        b_dq = tl.load(dq + row * K + offs, mask=mask, other=0.0)
        b_dk = tl.load(dk + row * K + offs, mask=mask, other=0.0)
        d_cum = tl.sum(b_q * b_dq - b_k * b_dk, axis=1)  # dL/dB_t
        chunk_total = tl.sum(d_cum, axis=0)
        # sum_{s >= t} within the chunk = chunk total - exclusive prefix sum.
        suffix = chunk_total - tl.cumsum(d_cum, axis=0) + d_cum
        tl.store(dg + row + rows * H, suffix + carry, mask=valid)
        carry += chunk_total
