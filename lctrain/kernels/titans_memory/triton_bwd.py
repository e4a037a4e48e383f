"""Triton backward kernels of `titans_linear_memory` (forward and notation in `triton_fwd.py`).

Per chunk, with W = (Q K^T) * D diag(theta), the leaving-state gradients dM_C, dS_C, and (last row C)
d = D[C] theta, r = R[C] theta:

    dE   = -W^T dO - diag(d) K dM_C - diag(r) K dS_C                       (dv = -dE)
    dM_0 = Q^T diag(B) dO + B_C dM_C + K^T dE
    dS_0 = Q^T diag(c) dO + c_C dM_C + A_C dS_C

  1. `titans_bwd_local_kernel` (chunk x head x V block): the state-free part of dE, -W^T dO.
  2. `titans_bwd_state_kernel` (sequence x head x V block, chunks in reverse) carries dM, dS and stores the
     gradient of the state leaving every chunk; the last dM_0, dS_0 are the initial-state gradients. It needs
     no forward state: dE does not depend on M0.
  3. `titans_bwd_chunk_kernel` (chunk x head x V block) reloads the chunk's entering (M0, S0) and leaving
     gradient, and produces dv, partial dq, dk (summed over V blocks by the caller) and partial gate
     gradients. The gates enter through B, c, D theta (every token) and B_C, c_C, A_C, D[C] theta, R[C] theta
     (the hand-off); their gradients are pushed through D = L R and c = L A onto the cumulative logs, and a
     reverse cumulative sum gives d log(1 - alpha) and d log(eta). Every step is linear in dO, dM_C, dS_C,
     so partial sums over V blocks add up exactly.
"""
import triton
import triton.language as tl

from lctrain.kernels.titans_memory.triton_fwd import (TINY, chunk_gates, chunk_handoff, chunk_mixing, chunk_position,
                                                      load_tile, row_of, store_tile)


@triton.jit
def titans_bwd_local_kernel(q, k, alpha, eta, theta, d_out, d_error_local, cu_seqlens, chunk_indices, chunk_size,
                            H, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            PRECISION: tl.constexpr):
    """Per chunk (axis 0), head (axis 1) and V block (axis 2): the state-free part of dE, -W^T dO, into
    d_error_local `[T, H, V]` fp32. Loops over K in blocks of BK."""
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    t0, count = chunk_position(cu_seqlens, chunk_indices, i_t, chunk_size)
    rows = tl.arange(0, BT)
    row_ok = rows < count
    v_cols = i_v * BV + tl.arange(0, BV)
    v_ok = v_cols < V
    _, _, rate, cum_keep, cum_decay = chunk_gates(alpha + i_h, eta + i_h, theta + i_h, t0, rows, row_ok, H)
    _, _, in_memory, _, _, _ = chunk_mixing(cum_keep, cum_decay, rows, PRECISION)
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        k_cols = i_k * BK + tl.arange(0, BK)
        k_ok = k_cols < K
        q_blk = load_tile(q + i_h * K, t0, rows, row_ok, H * K, k_cols, k_ok)
        k_blk = load_tile(k + i_h * K, t0, rows, row_ok, H * K, k_cols, k_ok)
        qk += tl.dot(q_blk, tl.trans(k_blk), input_precision=PRECISION)
    do_blk = load_tile(d_out + i_h * V, t0, rows, row_ok, H * V, v_cols, v_ok)
    local = -tl.dot(tl.trans(qk * in_memory * rate[None, :]), do_blk, input_precision=PRECISION)
    store_tile(d_error_local + i_h * V, local, t0, rows, row_ok, H * V, v_cols, v_ok)


@triton.jit
def titans_bwd_state_kernel(q, k, alpha, eta, theta, d_out, d_error_local, d_final_memory, d_final_momentum,
                            chunk_d_memory, chunk_d_momentum, d_initial_memory, d_initial_momentum,
                            cu_seqlens, chunk_offsets, chunk_size, H, K, V,
                            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """Per sequence x head (axis 0) and V block (axis 1); BK covers all of K.

    d_error_local `[T, H, V]` from `titans_bwd_local_kernel`; d_final_* and d_initial_* `[N, H, K, V]`,
    chunk_d_* `[NT, H, K, V]` (gradient of the state leaving each chunk), all fp32.
    """
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.cast(tl.load(cu_seqlens + i_n), tl.int64)
    eos = tl.cast(tl.load(cu_seqlens + i_n + 1), tl.int64)
    first_chunk = tl.cast(tl.load(chunk_offsets + i_n), tl.int64)
    num_chunks = tl.cdiv(eos - bos, chunk_size)
    rows = tl.arange(0, BT)
    k_cols = tl.arange(0, BK)
    k_ok = k_cols < K
    v_cols = i_v * BV + tl.arange(0, BV)
    v_ok = v_cols < V
    state_offs = k_cols[:, None] * V + v_cols[None, :]
    state_mask = k_ok[:, None] & v_ok[None, :]
    head_state = tl.cast(i_nh, tl.int64) * K * V
    d_memory = tl.load(d_final_memory + head_state + state_offs, mask=state_mask, other=0.0)
    d_momentum = tl.load(d_final_momentum + head_state + state_offs, mask=state_mask, other=0.0)
    for i in range(0, num_chunks):
        i_c = num_chunks - 1 - i
        t0 = bos + i_c * chunk_size
        count = tl.minimum(eos - t0, chunk_size)
        row_ok = rows < count
        is_last = rows == count - 1
        chunk_head = ((first_chunk + i_c) * H + i_h) * K * V
        tl.store(chunk_d_memory + chunk_head + state_offs, d_memory, mask=state_mask)
        tl.store(chunk_d_momentum + chunk_head + state_offs, d_momentum, mask=state_mask)

        _, _, rate, cum_keep, cum_decay = chunk_gates(alpha + i_h, eta + i_h, theta + i_h, t0, rows, row_ok, H)
        last_mix, last_carry, keep_m_last, s0_last, keep_s_last = chunk_handoff(
            cum_keep, cum_decay, rate, rows, row_ok, is_last)
        # c_t = sum_{s <= t} exp(cum_keep_t - cum_keep_s + cum_decay_s), a row sum of a transient matrix.
        s0_in_memory = tl.sum(tl.exp(tl.where(rows[:, None] >= rows[None, :],
                                              cum_keep[:, None] + (cum_decay - cum_keep)[None, :],
                                              float("-inf"))), axis=1)
        q_blk = load_tile(q + i_h * K, t0, rows, row_ok, H * K, k_cols, k_ok)
        k_blk = load_tile(k + i_h * K, t0, rows, row_ok, H * K, k_cols, k_ok)
        do_blk = load_tile(d_out + i_h * V, t0, rows, row_ok, H * V, v_cols, v_ok)
        d_error = load_tile(d_error_local + i_h * V, t0, rows, row_ok, H * V, v_cols, v_ok)
        d_error -= last_mix[:, None] * tl.dot(k_blk, d_memory, input_precision=PRECISION)
        d_error -= last_carry[:, None] * tl.dot(k_blk, d_momentum, input_precision=PRECISION)

        next_d_memory = keep_m_last * d_memory
        next_d_memory += tl.dot(tl.trans(q_blk * tl.exp(cum_keep)[:, None]), do_blk, input_precision=PRECISION)
        next_d_memory += tl.dot(tl.trans(k_blk), d_error, input_precision=PRECISION)
        d_momentum = s0_last * d_memory + keep_s_last * d_momentum
        d_momentum += tl.dot(tl.trans(q_blk * s0_in_memory[:, None]), do_blk, input_precision=PRECISION)
        d_memory = next_d_memory
    tl.store(d_initial_memory + head_state + state_offs, d_memory, mask=state_mask)
    tl.store(d_initial_momentum + head_state + state_offs, d_momentum, mask=state_mask)


@triton.jit
def titans_bwd_chunk_kernel(q, k, v, alpha, eta, theta, d_out, chunk_memory, chunk_momentum,
                            chunk_d_memory, chunk_d_momentum, dq_part, dk_part, dv, d_alpha_part, d_eta_part,
                            d_theta_part, cu_seqlens, chunk_indices, chunk_size, total_tokens, H, K, V,
                            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """Per chunk (axis 0), head (axis 1) and V block (axis 2); loops over K in blocks of BK.

    chunk_* `[NT, H, K, V]` fp32; writes dv `[T, H, V]` and the V-block partials dq_part, dk_part
    `[NV, T, H, K]`, d_alpha_part, d_eta_part, d_theta_part `[NV, T, H]`, all fp32.
    """
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    t0, count = chunk_position(cu_seqlens, chunk_indices, i_t, chunk_size)
    rows = tl.arange(0, BT)
    row_ok = rows < count
    is_last = rows == count - 1
    v_cols = i_v * BV + tl.arange(0, BV)
    v_ok = v_cols < V
    chunk_head = (tl.cast(i_t, tl.int64) * H + i_h) * K * V
    part = tl.cast(i_v, tl.int64) * total_tokens * H

    keep, decay, rate, cum_keep, cum_decay = chunk_gates(alpha + i_h, eta + i_h, theta + i_h, t0, rows, row_ok, H)
    carry_momentum, carry_memory, in_memory, keep_s0, keep_m0, s0_in_memory = chunk_mixing(
        cum_keep, cum_decay, rows, PRECISION)
    mix_rate = in_memory * rate[None, :]
    carry_rate = carry_momentum * rate[None, :]
    last_mix = row_of(mix_rate, is_last)
    last_carry = row_of(carry_rate, is_last)

    # Pass 1 over K: everything that contracts the key dim.
    v_blk = load_tile(v + i_h * V, t0, rows, row_ok, H * V, v_cols, v_ok)
    do_blk = load_tile(d_out + i_h * V, t0, rows, row_ok, H * V, v_cols, v_ok)
    error = -v_blk  # E = K M0 - V
    q_memory = tl.zeros([BT, BV], dtype=tl.float32)  # Q M0
    q_momentum = tl.zeros([BT, BV], dtype=tl.float32)  # Q S0
    k_d_memory = tl.zeros([BT, BV], dtype=tl.float32)  # K dM_C
    k_d_momentum = tl.zeros([BT, BV], dtype=tl.float32)  # K dS_C
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    d_keep_m_last = 0.0  # <dM_C, M0>
    d_s0_last = 0.0  # <dM_C, S0>
    d_keep_s_last = 0.0  # <dS_C, S0>
    for i_k in range(0, tl.cdiv(K, BK)):
        k_cols = i_k * BK + tl.arange(0, BK)
        k_ok = k_cols < K
        state_offs = k_cols[:, None] * V + v_cols[None, :]
        state_mask = k_ok[:, None] & v_ok[None, :]
        q_blk = load_tile(q + i_h * K, t0, rows, row_ok, H * K, k_cols, k_ok)
        k_blk = load_tile(k + i_h * K, t0, rows, row_ok, H * K, k_cols, k_ok)
        memory = tl.load(chunk_memory + chunk_head + state_offs, mask=state_mask, other=0.0)
        momentum = tl.load(chunk_momentum + chunk_head + state_offs, mask=state_mask, other=0.0)
        d_memory = tl.load(chunk_d_memory + chunk_head + state_offs, mask=state_mask, other=0.0)
        d_momentum = tl.load(chunk_d_momentum + chunk_head + state_offs, mask=state_mask, other=0.0)
        error += tl.dot(k_blk, memory, input_precision=PRECISION)
        q_memory += tl.dot(q_blk, memory, input_precision=PRECISION)
        q_momentum += tl.dot(q_blk, momentum, input_precision=PRECISION)
        k_d_memory += tl.dot(k_blk, d_memory, input_precision=PRECISION)
        k_d_momentum += tl.dot(k_blk, d_momentum, input_precision=PRECISION)
        qk += tl.dot(q_blk, tl.trans(k_blk), input_precision=PRECISION)
        d_keep_m_last += tl.sum(tl.sum(d_memory * memory, axis=1), axis=0)
        d_s0_last += tl.sum(tl.sum(d_memory * momentum, axis=1), axis=0)
        d_keep_s_last += tl.sum(tl.sum(d_momentum * momentum, axis=1), axis=0)

    scores = qk * mix_rate  # W
    d_error = -tl.dot(tl.trans(scores), do_blk, input_precision=PRECISION)
    d_error -= last_mix[:, None] * k_d_memory + last_carry[:, None] * k_d_momentum
    store_tile(dv + i_h * V, -d_error, t0, rows, row_ok, H * V, v_cols, v_ok)
    d_scores = -tl.dot(do_blk, tl.trans(error), input_precision=PRECISION)  # dW
    d_qk = d_scores * mix_rate

    # Gates. Gradients of the per-token coefficients, the hand-off ones added on the last row.
    d_keep_m0 = tl.sum(do_blk * q_memory, axis=1) + tl.where(is_last, d_keep_m_last, 0.0)
    d_s0_in_memory = tl.sum(do_blk * q_momentum, axis=1) + tl.where(is_last, d_s0_last, 0.0)
    d_keep_s0 = tl.where(is_last, d_keep_s_last, 0.0)
    d_mix_rate = d_scores * qk + tl.where(is_last[:, None], -tl.sum(k_d_memory * error, axis=1)[None, :], 0.0)
    d_carry_rate = tl.where(is_last[:, None], -tl.sum(k_d_momentum * error, axis=1)[None, :], 0.0)
    d_rate = tl.sum(d_mix_rate * in_memory, axis=0) + tl.sum(d_carry_rate * carry_momentum, axis=0)
    d_mix = d_mix_rate * rate[None, :]
    # D = L R and c = L A.
    d_carry_memory = tl.dot(d_mix, tl.trans(carry_momentum), input_precision=PRECISION)
    d_carry_memory += d_s0_in_memory[:, None] * keep_s0[None, :]
    d_carry_momentum = tl.dot(tl.trans(carry_memory), d_mix, input_precision=PRECISION) + d_carry_rate * rate[None, :]
    d_keep_s0 += tl.sum(d_s0_in_memory[:, None] * carry_memory, axis=0)
    # L[t, s] = exp(cum_t - cum_s): its gradient reaches cum_t and -cum_s; likewise R; B = exp(cum_keep).
    memory_flow = d_carry_memory * carry_memory
    momentum_flow = d_carry_momentum * carry_momentum
    d_cum_keep = tl.sum(memory_flow, axis=1) - tl.sum(memory_flow, axis=0) + d_keep_m0 * keep_m0
    d_cum_decay = tl.sum(momentum_flow, axis=1) - tl.sum(momentum_flow, axis=0) + d_keep_s0 * keep_s0
    d_cum_keep = tl.where(row_ok, d_cum_keep, 0.0)
    d_cum_decay = tl.where(row_ok, d_cum_decay, 0.0)
    # Adjoint of the inclusive cumulative sum: d log x_i = sum_{t >= i} d cum_t.
    d_log_keep = tl.sum(d_cum_keep, axis=0) - tl.cumsum(d_cum_keep, axis=0) + d_cum_keep
    d_log_decay = tl.sum(d_cum_decay, axis=0) - tl.cumsum(d_cum_decay, axis=0) + d_cum_decay
    # The clamp at TINY has zero gradient, as in the PyTorch path.
    d_alpha = -tl.where(keep >= TINY, d_log_keep / tl.maximum(keep, TINY), 0.0)
    d_eta = tl.where(decay >= TINY, d_log_decay / tl.maximum(decay, TINY), 0.0)
    gate_offs = part + (t0 + rows) * H + i_h
    tl.store(d_alpha_part + gate_offs, d_alpha, mask=row_ok)
    tl.store(d_eta_part + gate_offs, d_eta, mask=row_ok)
    tl.store(d_theta_part + gate_offs, d_rate, mask=row_ok)

    # Pass 2 over K: dq and dk.
    for i_k in range(0, tl.cdiv(K, BK)):
        k_cols = i_k * BK + tl.arange(0, BK)
        k_ok = k_cols < K
        state_offs = k_cols[:, None] * V + v_cols[None, :]
        state_mask = k_ok[:, None] & v_ok[None, :]
        q_blk = load_tile(q + i_h * K, t0, rows, row_ok, H * K, k_cols, k_ok)
        k_blk = load_tile(k + i_h * K, t0, rows, row_ok, H * K, k_cols, k_ok)
        memory = tl.load(chunk_memory + chunk_head + state_offs, mask=state_mask, other=0.0)
        momentum = tl.load(chunk_momentum + chunk_head + state_offs, mask=state_mask, other=0.0)
        d_memory = tl.load(chunk_d_memory + chunk_head + state_offs, mask=state_mask, other=0.0)
        d_momentum = tl.load(chunk_d_momentum + chunk_head + state_offs, mask=state_mask, other=0.0)
        dq_blk = keep_m0[:, None] * tl.dot(do_blk, tl.trans(memory), input_precision=PRECISION)
        dq_blk += s0_in_memory[:, None] * tl.dot(do_blk, tl.trans(momentum), input_precision=PRECISION)
        dq_blk += tl.dot(d_qk, k_blk, input_precision=PRECISION)
        dk_blk = tl.dot(d_error, tl.trans(memory), input_precision=PRECISION)
        dk_blk -= last_mix[:, None] * tl.dot(error, tl.trans(d_memory), input_precision=PRECISION)
        dk_blk -= last_carry[:, None] * tl.dot(error, tl.trans(d_momentum), input_precision=PRECISION)
        dk_blk += tl.dot(tl.trans(d_qk), q_blk, input_precision=PRECISION)
        store_tile(dq_part + part * K + i_h * K, dq_blk, t0, rows, row_ok, H * K, k_cols, k_ok)
        store_tile(dk_part + part * K + i_h * K, dk_blk, t0, rows, row_ok, H * K, k_cols, k_ok)
