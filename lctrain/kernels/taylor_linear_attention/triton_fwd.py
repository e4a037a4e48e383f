"""Triton forward kernel of `taylor_linear_attention` (quadratic within a chunk, feature state across chunks).

One program per (sequence * head, value block) walks its token range chunk by chunk:

* intra-chunk: the [BT, BT] polynomial scores 1 + x + x^2/2 (x = scale q k^T, causal) times the chunk's values;
* inter-chunk: phi_q(q)^T S with the state S = [row 0 | first-order rows | D second-order slices] of
  `common.py`. The second-order part splits exactly over the first key index a,

      (scale^2 / 2) (q . k)^2 = sum_a ((scale^2 / 2) q_a q) . (k_a k),

  so each of the D + 1 slices (D second-order slices and the first-order rows) is a linear-attention update
  with D-wide features and a [BD, BV] state tile. The full state (F = 1 + D + D^2 rows) does not fit in
  registers, so it lives in the program's own region of the output state buffer (which the caller fills with
  the initial state): each slice is loaded, used, updated and stored back. Only this program touches that
  region, and a barrier after each store makes the write visible to every thread before the next load.

The appended ones column of [v, 1] (column V) is synthesised in registers, so y = [numerator | normaliser]
`[T_total, H, V + 1]` comes out without copying v. All arithmetic is fp32 (tf32 dots on the GPU).

Layouts (contiguous): q, k `[T_total, H, D]`, v `[T_total, H, V]`, y `[T_total, H, V + 1]` fp32, state
`[N, H, 1 + D + D^2, V + 1]` fp32, cu_seqlens int32 `[N + 1]`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lctrain.kernels.addressing import split_row


@triton.jit
def slice_features(b_q, b_k, p, offs_d, scale, D):
    """Query/key coefficients of state slice p: the second-order slice a = p for p < D (query
    (scale^2/2) q_a q against key k_a k), the first-order rows for p == D (scale q against k).
    Returns (first row of the slice in the state, per-token query coefficient, per-token key coefficient)."""
    second = p < D
    q_col = tl.sum(tl.where(offs_d[None, :] == p, b_q, 0.0), axis=1)
    k_col = tl.sum(tl.where(offs_d[None, :] == p, b_k, 0.0), axis=1)
    coef_q = tl.where(second, 0.5 * scale * scale * q_col, scale)
    coef_k = tl.where(second, k_col, 1.0)
    row0 = tl.where(second, 1 + D + p * D, 1)
    return row0, coef_q, coef_k


@triton.jit
def load_features(x_seq, t0, rows, mask_td, offs_d, H, D):
    """[BT, BD] fp32 tile of q or k (`[T_total, H, D]`, this sequence and head at `x_seq`) for the chunk whose
    first token is t0 (64-bit high part) + rows (32-bit low part); masked rows and columns are 0."""
    return tl.load(x_seq + t0 * (H * D) + rows[:, None] * (H * D) + offs_d[None, :], mask=mask_td,
                   other=0.0).to(tl.float32)


@triton.jit
def load_values(v_chunk, offs_t, valid, offs_v, H, V):
    """[BT, BV] tile of [v, 1] for the chunk starting at `v_chunk` (rows `offs_t` of it): column V is 1 on valid
    tokens, everything past it 0."""
    b_v = tl.load(v_chunk + offs_t[:, None] * (H * V) + offs_v[None, :],
                  mask=valid[:, None] & (offs_v < V)[None, :], other=0.0).to(tl.float32)
    return tl.where(valid[:, None] & (offs_v == V)[None, :], 1.0, b_v)


@triton.jit
def taylor_fwd_kernel(
    q, k, v, y, state, cu_seqlens,
    scale, H, D, V,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
):
    # documents x heads on grid axis 0 (up to 2^31 - 1 programs; axes 1-2 stop at 65,535), value blocks on axis 1
    i_nh = tl.program_id(0)
    i_n = i_nh // H
    i_h = i_nh % H
    i_v = tl.program_id(1)
    bos = tl.load(cu_seqlens + i_n)
    length = tl.load(cu_seqlens + i_n + 1) - bos
    VP = V + 1
    # 64-bit base pointers for this (sequence, head), advanced by a 64-bit scalar per chunk (token * row stride
    # passes 2^31 in one long document); offsets inside a chunk tile stay 32-bit.
    row0_seq = tl.cast(bos, tl.int64) * H + i_h
    q_seq = q + row0_seq * D
    k_seq = k + row0_seq * D
    v_seq = v + row0_seq * V
    y_seq = y + row0_seq * VP
    state_seq = state + tl.cast(i_nh, tl.int64) * (1 + D + D * D) * VP

    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_d = offs_d < D
    mask_v = offs_v < VP
    causal = offs_t[:, None] >= offs_t[None, :]
    zeroth = tl.load(state_seq + offs_v, mask=mask_v, other=0.0)  # row 0: sum of [v, 1]

    for i_c in range(0, tl.cdiv(length, BT)):
        t0, t_low = split_row(i_c * BT)  # 64-bit high part and 32-bit low part of the chunk's first token
        rows = t_low + offs_t
        valid = i_c * BT + offs_t < length
        mask_td = valid[:, None] & mask_d[None, :]
        b_q = load_features(q_seq, t0, rows, mask_td, offs_d, H, D)
        b_k = load_features(k_seq, t0, rows, mask_td, offs_d, H, D)
        b_v = load_values(v_seq + t0 * (H * V), rows, valid, offs_v, H, V)

        # Intra-chunk: the polynomial itself; padded key rows carry [v, 1] = 0, so only causality is masked.
        x = tl.dot(b_q, tl.trans(b_k)) * scale
        scores = tl.where(causal, 1.0 + x + 0.5 * x * x, 0.0)
        b_y = tl.dot(scores, b_v) + zeroth[None, :]
        # Inter-chunk, slice by slice, updating the state after it has been read.
        for p in range(0, D + 1):
            row0, coef_q, coef_k = slice_features(b_q, b_k, p, offs_d, scale, D)
            offs_state = (row0 + offs_d)[:, None] * VP + offs_v[None, :]
            mask_state = mask_d[:, None] & mask_v[None, :]
            b_s = tl.load(state_seq + offs_state, mask=mask_state, other=0.0)
            b_y += tl.dot(b_q * coef_q[:, None], b_s)
            b_s += tl.dot(tl.trans(b_k * coef_k[:, None]), b_v)
            tl.store(state_seq + offs_state, b_s, mask=mask_state)
            tl.debug_barrier()
        zeroth += tl.sum(b_v, axis=0)
        tl.store(y_seq + t0 * (H * VP) + rows[:, None] * (H * VP) + offs_v[None, :], b_y,
                 mask=valid[:, None] & mask_v[None, :])

    tl.store(state_seq + offs_v, zeroth, mask=mask_v)
