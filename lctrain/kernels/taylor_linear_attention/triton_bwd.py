"""Triton backward kernels of `taylor_linear_attention`.

With y = [numerator | normaliser] (see `triton_fwd.py`), dy its gradient, x = scale q k^T, A = 1 + x + x^2/2
(causal), dA = dy [v, 1]^T (causal) and dX = dA * (1 + x) inside a chunk:

1. `taylor_bwd_dq_kernel`, forward in time, rebuilding the state entering each chunk in a scratch buffer
   (filled with the initial state by the caller):
       dq = scale dX K  +  sum over slices of d(phi_q(q)^T S dy)/dq
   For the first-order rows that is scale (dy S1^T); for second-order slice a, with w = dy S2[a]^T,
   d/dq [ (scale^2/2) q_a (q . w) ] = (scale^2/2) (q_a w + e_a (q . w)).
2. `taylor_bwd_dkv_kernel`, backward in time, carrying R = dL/dS in a scratch buffer (filled with the
   final-state gradient by the caller; it ends as the initial-state gradient):
       dk = scale dX^T Q  +  per slice: first order u, second order k_a u + e_a (k . u), with u = [v, 1] R^T
       dv = A^T dy  +  phi_k(k) R      (value columns only; the ones column has no gradient)
       R <- R + phi_q(Q)^T dy
   (no symmetry of S or R is assumed, so an arbitrary initial state or final-state gradient is exact).
dq and dk sum over value columns, so each value block writes fp32 partials `[NV, T_total, H, D]` that the
caller sums; dv is complete per block. Layouts as in `triton_fwd.py`; dy `[T_total, H, V + 1]` fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lctrain.kernels.addressing import split_row

from lctrain.kernels.taylor_linear_attention.triton_fwd import load_features, load_values, slice_features


@triton.jit
def taylor_bwd_dq_kernel(
    q, k, v, dy, state, dq_part, cu_seqlens,
    scale, total_tokens, H, D, V,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
):
    # grid and 64-bit addressing as in the forward kernel
    i_nh = tl.program_id(0)
    i_n = i_nh // H
    i_h = i_nh % H
    i_v = tl.program_id(1)
    bos = tl.load(cu_seqlens + i_n)
    length = tl.load(cu_seqlens + i_n + 1) - bos
    VP = V + 1
    row0_seq = tl.cast(bos, tl.int64) * H + i_h
    q_seq = q + row0_seq * D
    k_seq = k + row0_seq * D
    v_seq = v + row0_seq * V
    dy_seq = dy + row0_seq * VP
    dq_seq = dq_part + (tl.cast(i_v, tl.int64) * total_tokens * H + row0_seq) * D
    state_seq = state + tl.cast(i_nh, tl.int64) * (1 + D + D * D) * VP

    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_d = offs_d < D
    mask_v = offs_v < VP
    causal = offs_t[:, None] >= offs_t[None, :]

    for i_c in range(0, tl.cdiv(length, BT)):
        t0, t_low = split_row(i_c * BT)  # 64-bit high part, 32-bit low part of the first token
        rows = t_low + offs_t
        valid = i_c * BT + offs_t < length
        mask_td = valid[:, None] & mask_d[None, :]
        b_q = load_features(q_seq, t0, rows, mask_td, offs_d, H, D)
        b_k = load_features(k_seq, t0, rows, mask_td, offs_d, H, D)
        b_v = load_values(v_seq + t0 * (H * V), rows, valid, offs_v, H, V)
        b_dy = tl.load(dy_seq + t0 * (H * VP) + rows[:, None] * (H * VP) + offs_v[None, :],
                       mask=valid[:, None] & mask_v[None, :], other=0.0)

        x = tl.dot(b_q, tl.trans(b_k)) * scale
        d_scores = tl.where(causal, tl.dot(b_dy, tl.trans(b_v)), 0.0)
        b_dq = tl.dot(d_scores * (1.0 + x), b_k) * scale
        for p in range(0, D + 1):
            row0, coef_q, coef_k = slice_features(b_q, b_k, p, offs_d, scale, D)
            offs_state = (row0 + offs_d)[:, None] * VP + offs_v[None, :]
            mask_state = mask_d[:, None] & mask_v[None, :]
            b_s = tl.load(state_seq + offs_state, mask=mask_state, other=0.0)
            w = tl.dot(b_dy, tl.trans(b_s))  # [BT, BD]
            second = tl.where(p < D, 0.5 * scale * scale, 0.0)
            b_dq += coef_q[:, None] * w
            b_dq += tl.where(offs_d[None, :] == p, second * tl.sum(b_q * w, axis=1)[:, None], 0.0)
            b_s += tl.dot(tl.trans(b_k * coef_k[:, None]), b_v)
            tl.store(state_seq + offs_state, b_s, mask=mask_state)
            tl.debug_barrier()
        tl.store(dq_seq + t0 * (H * D) + rows[:, None] * (H * D) + offs_d[None, :], b_dq, mask=mask_td)


@triton.jit
def taylor_bwd_dkv_kernel(
    q, k, v, dy, d_state, dk_part, dv, cu_seqlens,
    scale, total_tokens, H, D, V,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
):
    # grid and 64-bit addressing as in the forward kernel
    i_nh = tl.program_id(0)
    i_n = i_nh // H
    i_h = i_nh % H
    i_v = tl.program_id(1)
    bos = tl.load(cu_seqlens + i_n)
    length = tl.load(cu_seqlens + i_n + 1) - bos
    num_chunks = tl.cdiv(length, BT)
    VP = V + 1
    row0_seq = tl.cast(bos, tl.int64) * H + i_h
    q_seq = q + row0_seq * D
    k_seq = k + row0_seq * D
    v_seq = v + row0_seq * V
    dy_seq = dy + row0_seq * VP
    dv_seq = dv + row0_seq * V
    dk_seq = dk_part + (tl.cast(i_v, tl.int64) * total_tokens * H + row0_seq) * D
    state_seq = d_state + tl.cast(i_nh, tl.int64) * (1 + D + D * D) * VP

    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_d = offs_d < D
    mask_v = offs_v < VP
    causal = offs_t[:, None] >= offs_t[None, :]
    d_zeroth = tl.load(state_seq + offs_v, mask=mask_v, other=0.0)

    for i_rev in range(0, num_chunks):
        i_c = num_chunks - 1 - i_rev
        t0, t_low = split_row(i_c * BT)  # 64-bit high part, 32-bit low part of the first token
        rows = t_low + offs_t
        valid = i_c * BT + offs_t < length
        mask_td = valid[:, None] & mask_d[None, :]
        b_q = load_features(q_seq, t0, rows, mask_td, offs_d, H, D)
        b_k = load_features(k_seq, t0, rows, mask_td, offs_d, H, D)
        b_v = load_values(v_seq + t0 * (H * V), rows, valid, offs_v, H, V)
        b_dy = tl.load(dy_seq + t0 * (H * VP) + rows[:, None] * (H * VP) + offs_v[None, :],
                       mask=valid[:, None] & mask_v[None, :], other=0.0)

        x = tl.dot(b_q, tl.trans(b_k)) * scale  # [i, j]
        scores = tl.where(causal, 1.0 + x + 0.5 * x * x, 0.0)
        d_scores = tl.where(causal, tl.dot(b_dy, tl.trans(b_v)), 0.0)
        b_dk = tl.dot(tl.trans(d_scores * (1.0 + x)), b_q) * scale
        b_dv = tl.dot(tl.trans(scores), b_dy) + d_zeroth[None, :]
        for p in range(0, D + 1):
            row0, coef_q, coef_k = slice_features(b_q, b_k, p, offs_d, scale, D)
            offs_state = (row0 + offs_d)[:, None] * VP + offs_v[None, :]
            mask_state = mask_d[:, None] & mask_v[None, :]
            b_r = tl.load(state_seq + offs_state, mask=mask_state, other=0.0)
            b_dv += tl.dot(b_k * coef_k[:, None], b_r)
            u = tl.dot(b_v, tl.trans(b_r))  # [BT, BD]
            # first order: + u; second-order slice a = p: + k_a u + e_a (k . u)
            b_dk += coef_k[:, None] * u
            b_dk += tl.where((offs_d[None, :] == p) & (p < D), tl.sum(b_k * u, axis=1)[:, None], 0.0)
            b_r += tl.dot(tl.trans(b_q * coef_q[:, None]), b_dy)
            tl.store(state_seq + offs_state, b_r, mask=mask_state)
            tl.debug_barrier()
        d_zeroth += tl.sum(b_dy, axis=0)
        tl.store(dk_seq + t0 * (H * D) + rows[:, None] * (H * D) + offs_d[None, :], b_dk, mask=mask_td)
        tl.store(dv_seq + t0 * (H * V) + rows[:, None] * (H * V) + offs_v[None, :], b_dv,
                 mask=valid[:, None] & (offs_v < V)[None, :])

    tl.store(state_seq + offs_v, d_zeroth, mask=mask_v)
