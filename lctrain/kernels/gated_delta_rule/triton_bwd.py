"""Triton backward kernels of the chunked Gated DeltaNet (WY/UT form; forward in `triton_fwd.py`).

Per chunk, with entering state S_0, leaving-state gradient dS and delta = U - W S_0 saved by the forward:
  1. `gdn_bwd_state_kernel`  (sequence x head x V-block, chunks in reverse):
        d_delta = Aqk^T dO + diag(e^{G_C - G}) K dS
        dS_0    = e^{G_C} dS + scale (e^G Q)^T dO - W^T d_delta
     storing every chunk's dS and d_delta; the last dS_0 is the initial-state gradient.
  2. per chunk x head, each pass small enough to stay in registers, accumulating into fp32 buffers the
     chunk owns (so later launches may read-modify-write them):
       `gdn_bwd_dv_kernel` (over V): dv, the gradient of Q K^T, dA's U share, first dbeta and dG shares;
       `gdn_bwd_dq_kernel`: dq = scale e^G dO S_0^T + d_qk K;
       `gdn_bwd_dk_kernel`: dk shares from Aqk and from the leaving state, and the G_C terms;
       `gdn_bwd_dw_kernel`: dW = -d_delta S_0^T and its shares of dk, dbeta, dG and dA.
  3. `gdn_bwd_wy_kernel`     (chunk x head): dL = -A^T dA A^T through the inverse, its share of dk, dbeta,
     dG, and dg_t = sum_{s >= t in chunk} dG_s (the cumulative sum's adjoint).

As in the forward, products take operands in the q/k/v element type E and accumulate in fp32; the per-chunk
tensors that are only ever product operands (dS, d_delta, d_qk) are stored in E, the buffers that later
launches add to (dk_part, d_a and the dbeta/dG shares) in fp32.
"""
import triton
import triton.language as tl

from lctrain.kernels.gated_delta_rule.triton_fwd import chunk_span, load_raw, load_tile, store_tile


@triton.jit
def gdn_bwd_state_kernel(q, k, w, cum_gate, a_qk, d_out, d_final, chunk_grads, d_delta, d_initial,
                         cu_seqlens, chunk_offsets, scale, H, K, V,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_D_FINAL: tl.constexpr,
                         STORE_D_INITIAL: tl.constexpr, PRECISION: tl.constexpr):
    """Per sequence x head (axis 0) and V-block (axis 1); BK covers all of K.

    q, k, w `[T, H, K]`, cum_gate `[T, H]`, a_qk `[T, H, BT]`, d_out `[T, H, V]`, d_final/d_initial
    `[N, H, K, V]`. Writes chunk_grads `[NT, H, K, V]` (gradient of the state leaving each chunk) and
    d_delta `[T, H, V]` in k's type; the state gradient itself is carried in fp32.
    """
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.cast(tl.load(cu_seqlens + i_n), tl.int64)
    eos = tl.cast(tl.load(cu_seqlens + i_n + 1), tl.int64)
    first_chunk = tl.cast(tl.load(chunk_offsets + i_n), tl.int64)
    num_chunks = tl.cdiv(eos - bos, BT)
    rows = tl.arange(0, BT)
    k_rows = tl.arange(0, BK)
    k_ok = k_rows < K
    cols = i_v * BV + tl.arange(0, BV)
    col_ok = cols < V
    state_offs = k_rows[:, None] * V + cols[None, :]
    state_mask = k_ok[:, None] & col_ok[None, :]
    head_state = tl.cast(i_n * H + i_h, tl.int64) * K * V

    d_state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_D_FINAL:
        d_state += tl.load(d_final + head_state + state_offs, mask=state_mask, other=0.0)
    for i in range(0, num_chunks):
        c = num_chunks - 1 - i
        t0 = bos + c * BT
        row_ok = rows < eos - t0
        chunk_head = ((first_chunk + c) * H + i_h) * K * V
        d_state_e = tl.cast(d_state, k.dtype.element_ty)
        tl.store(chunk_grads + chunk_head + state_offs, d_state_e, mask=state_mask)
        cum = tl.load(cum_gate + (t0 + rows) * H + i_h, mask=row_ok, other=0.0)
        last = tl.minimum(eos - t0, BT) - 1
        cum_last = tl.load(cum_gate + (t0 + last) * H + i_h)
        aqk = load_raw(a_qk + i_h * BT, t0, rows, row_ok, H * BT, rows, rows < BT)
        do_blk = load_raw(d_out + i_h * V, t0, rows, row_ok, H * V, cols, col_ok)
        k_blk = load_raw(k + i_h * K, t0, rows, row_ok, H * K, k_rows, k_ok)
        # diag(e^{G_C - G}) K dS: the decay scales the product's rows, so k enters unrounded.
        dd_blk = tl.dot(k_blk, d_state_e, input_precision=PRECISION) * tl.exp(cum_last - cum)[:, None]
        dd_blk += tl.dot(tl.trans(aqk), do_blk, input_precision=PRECISION)
        store_tile(d_delta + i_h * V, dd_blk, t0, rows, row_ok, H * V, cols, col_ok)
        q_blk = load_tile(q + i_h * K, t0, rows, row_ok, H * K, k_rows, k_ok)
        q_blk = tl.cast(q_blk * (scale * tl.exp(cum))[:, None], k_blk.dtype)
        w_blk = load_raw(w + i_h * K, t0, rows, row_ok, H * K, k_rows, k_ok)
        d_state = d_state * tl.exp(cum_last)
        d_state += tl.dot(tl.trans(q_blk), do_blk, input_precision=PRECISION)
        d_state -= tl.dot(tl.trans(w_blk), tl.cast(dd_blk, w_blk.dtype), input_precision=PRECISION)
    if STORE_D_INITIAL:
        tl.store(d_initial + head_state + state_offs, d_state, mask=state_mask)


@triton.jit
def gdn_bwd_dv_kernel(v, beta, cum_gate, a_inv, a_qk, delta, d_out, d_delta, dv, d_qk, d_beta_part, d_gate_part,
                      d_a, cu_seqlens, chunk_indices, scale, H, V, BT: tl.constexpr, BV: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Per chunk x head, the pass over V: terms of o = Aqk delta and U = A diag(beta) V.

    Writes dv `[T, H, V]` and d_qk `[T, H, BT]` (gradient of the raw Q K^T product) in v's type, and, fp32,
    d_a `[T, H, BT]` (its U share), d_beta_part and d_gate_part `[T, H]` (first shares; later kernels add).
    """
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    _, t0, eos = chunk_span(cu_seqlens, chunk_indices, i_c, BT)
    rows = tl.arange(0, BT)
    row_ok = rows < eos - t0
    all_cols = rows < BT
    b = tl.cast(tl.load(beta + (t0 + rows) * H + i_h, mask=row_ok, other=0.0), tl.float32)
    cum = tl.load(cum_gate + (t0 + rows) * H + i_h, mask=row_ok, other=0.0)
    inv = load_raw(a_inv + i_h * BT, t0, rows, row_ok, H * BT, rows, all_cols)
    grad_qk = tl.zeros([BT, BT], dtype=tl.float32)  # dO delta^T = gradient of Aqk
    grad_a = tl.zeros([BT, BT], dtype=tl.float32)
    d_b = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        cols = i_v * BV + tl.arange(0, BV)
        col_ok = cols < V
        do_blk = load_raw(d_out + i_h * V, t0, rows, row_ok, H * V, cols, col_ok)
        d_blk = load_raw(delta + i_h * V, t0, rows, row_ok, H * V, cols, col_ok)
        grad_qk += tl.dot(do_blk, tl.trans(d_blk), input_precision=PRECISION)
        dd_blk = load_raw(d_delta + i_h * V, t0, rows, row_ok, H * V, cols, col_ok)
        v_blk = load_tile(v + i_h * V, t0, rows, row_ok, H * V, cols, col_ok)
        grad_a += tl.dot(dd_blk, tl.trans(tl.cast(v_blk * b[:, None], dd_blk.dtype)), input_precision=PRECISION)
        d_bv = tl.dot(tl.trans(inv), dd_blk, input_precision=PRECISION)  # gradient of beta V
        store_tile(dv + i_h * V, d_bv * b[:, None], t0, rows, row_ok, H * V, cols, col_ok)
        d_b += tl.sum(d_bv * v_blk, 1)
    aqk = load_tile(a_qk + i_h * BT, t0, rows, row_ok, H * BT, rows, all_cols)
    # Aqk_tj = scale (q_t . k_j) e^{G_t - G_j}: its gate gradient is +Aqk at G_t and -Aqk at G_j.
    gate_term = grad_qk * aqk
    d_cum = tl.sum(gate_term, 1) - tl.sum(gate_term, 0)
    causal_ok = (rows[:, None] >= rows[None, :]) & row_ok[:, None] & row_ok[None, :]
    decay = tl.exp(tl.where(causal_ok, cum[:, None] - cum[None, :], float("-inf")))
    store_tile(d_qk + i_h * BT, grad_qk * decay * scale, t0, rows, row_ok, H * BT, rows, all_cols)
    store_tile(d_a + i_h * BT, grad_a, t0, rows, row_ok, H * BT, rows, all_cols)
    tl.store(d_beta_part + (t0 + rows) * H + i_h, d_b, mask=row_ok)
    tl.store(d_gate_part + (t0 + rows) * H + i_h, d_cum, mask=row_ok)


@triton.jit
def gdn_bwd_dq_kernel(q, k, cum_gate, chunk_states, d_out, d_qk, dq, d_gate_part, cu_seqlens, chunk_indices,
                      scale, H, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Per chunk x head: dq `[T, H, K]` (q's dtype) = scale e^G dO S_0^T + d_qk K; adds the e^G term to
    d_gate_part."""
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    _, t0, eos = chunk_span(cu_seqlens, chunk_indices, i_c, BT)
    rows = tl.arange(0, BT)
    row_ok = rows < eos - t0
    chunk_head = (tl.cast(i_c, tl.int64) * H + i_h) * K * V
    cum = tl.load(cum_gate + (t0 + rows) * H + i_h, mask=row_ok, other=0.0)
    q_weight = scale * tl.exp(cum)
    d_cum = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        k_rows = i_k * BK + tl.arange(0, BK)
        k_ok = k_rows < K
        dq_blk = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            cols = i_v * BV + tl.arange(0, BV)
            col_ok = cols < V
            s_blk = load_raw(chunk_states + chunk_head, 0, k_rows, k_ok, V, cols, col_ok)
            do_blk = load_raw(d_out + i_h * V, t0, rows, row_ok, H * V, cols, col_ok)
            dq_blk += tl.dot(do_blk, tl.trans(s_blk), input_precision=PRECISION)
        q_blk = load_tile(q + i_h * K, t0, rows, row_ok, H * K, k_rows, k_ok)
        dq_blk = dq_blk * q_weight[:, None]
        d_cum += tl.sum(dq_blk * q_blk, 1)
        grad_qk = load_raw(d_qk + i_h * BT, t0, rows, row_ok, H * BT, rows, rows < BT)
        k_blk = load_raw(k + i_h * K, t0, rows, row_ok, H * K, k_rows, k_ok)
        dq_blk += tl.dot(grad_qk, k_blk, input_precision=PRECISION)
        store_tile(dq + i_h * K, dq_blk, t0, rows, row_ok, H * K, k_rows, k_ok)
    d_cum += tl.load(d_gate_part + (t0 + rows) * H + i_h, mask=row_ok, other=0.0)
    tl.store(d_gate_part + (t0 + rows) * H + i_h, d_cum, mask=row_ok)


@triton.jit
def gdn_bwd_dk_kernel(q, k, cum_gate, delta, chunk_states, chunk_grads, d_qk, dk_part, d_gate_part, cu_seqlens,
                      chunk_indices, H, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Per chunk x head: dk_part `[T, H, K]` = d_qk^T Q + diag(e^{G_C - G}) delta dS^T (fp32), and the
    leaving-state gate terms of d_gate_part (S_C = e^{G_C} S_0 + sum_j e^{G_C - G_j} k_j delta_j^T)."""
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    _, t0, eos = chunk_span(cu_seqlens, chunk_indices, i_c, BT)
    rows = tl.arange(0, BT)
    row_ok = rows < eos - t0
    chunk_head = (tl.cast(i_c, tl.int64) * H + i_h) * K * V
    cum = tl.load(cum_gate + (t0 + rows) * H + i_h, mask=row_ok, other=0.0)
    last = tl.minimum(eos - t0, BT) - 1
    cum_last = tl.load(cum_gate + (t0 + last) * H + i_h)
    to_end = tl.where(row_ok, tl.exp(cum_last - cum), 0.0)
    state_dot = tl.zeros([BK], dtype=tl.float32)  # sum(S_0 * dS) split by K row, for dG_C
    end_term = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        k_rows = i_k * BK + tl.arange(0, BK)
        k_ok = k_rows < K
        dk_blk = tl.zeros([BT, BK], dtype=tl.float32)  # delta dS^T
        for i_v in range(0, tl.cdiv(V, BV)):
            cols = i_v * BV + tl.arange(0, BV)
            col_ok = cols < V
            s_blk = load_tile(chunk_states + chunk_head, 0, k_rows, k_ok, V, cols, col_ok)
            ds_blk = load_raw(chunk_grads + chunk_head, 0, k_rows, k_ok, V, cols, col_ok)
            state_dot += tl.sum(s_blk * tl.cast(ds_blk, tl.float32), 1)
            d_blk = load_raw(delta + i_h * V, t0, rows, row_ok, H * V, cols, col_ok)
            dk_blk += tl.dot(d_blk, tl.trans(ds_blk), input_precision=PRECISION)
        k_blk = load_tile(k + i_h * K, t0, rows, row_ok, H * K, k_rows, k_ok)
        end_term += tl.sum(k_blk * dk_blk, 1) * to_end
        dk_blk = dk_blk * to_end[:, None]
        grad_qk = load_raw(d_qk + i_h * BT, t0, rows, row_ok, H * BT, rows, rows < BT)
        q_blk = load_raw(q + i_h * K, t0, rows, row_ok, H * K, k_rows, k_ok)
        dk_blk += tl.dot(tl.trans(grad_qk), q_blk, input_precision=PRECISION)
        store_tile(dk_part + i_h * K, dk_blk, t0, rows, row_ok, H * K, k_rows, k_ok)
    d_last = tl.sum(state_dot, 0) * tl.exp(cum_last) + tl.sum(end_term, 0)
    d_cum = tl.load(d_gate_part + (t0 + rows) * H + i_h, mask=row_ok, other=0.0)
    d_cum += tl.where(rows == last, d_last, 0.0) - end_term
    tl.store(d_gate_part + (t0 + rows) * H + i_h, d_cum, mask=row_ok)


@triton.jit
def gdn_bwd_dw_kernel(k, beta, cum_gate, a_inv, chunk_states, d_delta, dk_part, d_beta_part, d_gate_part, d_a,
                      cu_seqlens, chunk_indices, H, K, V, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, PRECISION: tl.constexpr):
    """Per chunk x head, through delta = U - W S_0 and W = A diag(beta e^G) K: dW = -d_delta S_0^T, whose
    shares go to dk_part, d_beta_part, d_gate_part and d_a (all fp32, updated in place)."""
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    _, t0, eos = chunk_span(cu_seqlens, chunk_indices, i_c, BT)
    rows = tl.arange(0, BT)
    row_ok = rows < eos - t0
    all_cols = rows < BT
    chunk_head = (tl.cast(i_c, tl.int64) * H + i_h) * K * V
    b = tl.cast(tl.load(beta + (t0 + rows) * H + i_h, mask=row_ok, other=0.0), tl.float32)
    gate = tl.exp(tl.load(cum_gate + (t0 + rows) * H + i_h, mask=row_ok, other=0.0))
    wk_term = tl.zeros([BT], dtype=tl.float32)  # gradient of e^{G_t} beta_t through W, over beta_t
    grad_a = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        k_rows = i_k * BK + tl.arange(0, BK)
        k_ok = k_rows < K
        dw_blk = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            cols = i_v * BV + tl.arange(0, BV)
            col_ok = cols < V
            s_blk = load_raw(chunk_states + chunk_head, 0, k_rows, k_ok, V, cols, col_ok)
            dd_blk = load_raw(d_delta + i_h * V, t0, rows, row_ok, H * V, cols, col_ok)
            dw_blk -= tl.dot(dd_blk, tl.trans(s_blk), input_precision=PRECISION)
        k_blk = load_tile(k + i_h * K, t0, rows, row_ok, H * K, k_rows, k_ok)
        dw_e = tl.cast(dw_blk, k.dtype.element_ty)
        grad_a += tl.dot(dw_e, tl.trans(tl.cast(k_blk * (b * gate)[:, None], dw_e.dtype)), input_precision=PRECISION)
        inv = load_raw(a_inv + i_h * BT, t0, rows, row_ok, H * BT, rows, all_cols)
        d_wk = tl.dot(tl.trans(inv), dw_e, input_precision=PRECISION)  # gradient of beta e^G K
        wk_term += tl.sum(d_wk * k_blk, 1)
        dk_blk = load_tile(dk_part + i_h * K, t0, rows, row_ok, H * K, k_rows, k_ok)
        store_tile(dk_part + i_h * K, dk_blk + d_wk * (b * gate)[:, None], t0, rows, row_ok, H * K, k_rows, k_ok)
    wk_term = wk_term * gate
    d_b = tl.load(d_beta_part + (t0 + rows) * H + i_h, mask=row_ok, other=0.0) + wk_term
    tl.store(d_beta_part + (t0 + rows) * H + i_h, d_b, mask=row_ok)
    d_cum = tl.load(d_gate_part + (t0 + rows) * H + i_h, mask=row_ok, other=0.0) + wk_term * b
    tl.store(d_gate_part + (t0 + rows) * H + i_h, d_cum, mask=row_ok)
    grad_a += load_tile(d_a + i_h * BT, t0, rows, row_ok, H * BT, rows, all_cols)
    store_tile(d_a + i_h * BT, grad_a, t0, rows, row_ok, H * BT, rows, all_cols)


@triton.jit
def gdn_bwd_wy_kernel(k, beta, cum_gate, a_inv, d_a, dk_part, d_beta_part, d_gate_part, dk, d_beta, dg,
                      cu_seqlens, chunk_indices, H, K, BT: tl.constexpr, BK: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Per chunk x head: finish dk `[T, H, K]`, d_beta and dg `[T, H]` (input dtypes) through A = (I + L)^-1,
    L_tj = beta_t (k_t . k_j) e^{G_t - G_j} for j < t."""
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    _, t0, eos = chunk_span(cu_seqlens, chunk_indices, i_c, BT)
    rows = tl.arange(0, BT)
    row_ok = rows < eos - t0
    all_cols = rows < BT
    b = tl.cast(tl.load(beta + (t0 + rows) * H + i_h, mask=row_ok, other=0.0), tl.float32)
    cum = tl.load(cum_gate + (t0 + rows) * H + i_h, mask=row_ok, other=0.0)
    inv = load_raw(a_inv + i_h * BT, t0, rows, row_ok, H * BT, rows, all_cols)
    grad_a = load_tile(d_a + i_h * BT, t0, rows, row_ok, H * BT, rows, all_cols)
    strict_ok = (rows[:, None] > rows[None, :]) & row_ok[:, None] & row_ok[None, :]
    # d(X^-1) adjoint: dX = -A^T dA A^T, and only the strictly lower part of X = I + L varies.
    grad_l = tl.dot(tl.cast(grad_a, inv.dtype), tl.trans(inv), input_precision=PRECISION)
    grad_l = -tl.dot(tl.trans(inv), tl.cast(grad_l, inv.dtype), input_precision=PRECISION)
    decay = tl.exp(tl.where(strict_ok, cum[:, None] - cum[None, :], float("-inf")))
    grad_l = tl.where(strict_ok, grad_l, 0.0) * decay  # gradient of beta_t (k_t . k_j)

    kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        k_rows = i_k * BK + tl.arange(0, BK)
        k_blk = load_raw(k + i_h * K, t0, rows, row_ok, H * K, k_rows, k_rows < K)
        kk += tl.dot(k_blk, tl.trans(k_blk), input_precision=PRECISION)
    beta_term = grad_l * kk
    d_b = tl.load(d_beta_part + (t0 + rows) * H + i_h, mask=row_ok, other=0.0) + tl.sum(beta_term, 1)
    gate_term = beta_term * b[:, None]
    d_cum = tl.load(d_gate_part + (t0 + rows) * H + i_h, mask=row_ok, other=0.0)
    d_cum += tl.sum(gate_term, 1) - tl.sum(gate_term, 0)
    grad_kk = tl.cast(grad_l * b[:, None], k.dtype.element_ty)
    for i_k in range(0, tl.cdiv(K, BK)):
        k_rows = i_k * BK + tl.arange(0, BK)
        k_ok = k_rows < K
        k_blk = load_raw(k + i_h * K, t0, rows, row_ok, H * K, k_rows, k_ok)
        dk_blk = load_tile(dk_part + i_h * K, t0, rows, row_ok, H * K, k_rows, k_ok)
        dk_blk += tl.dot(grad_kk, k_blk, input_precision=PRECISION)
        dk_blk += tl.dot(tl.trans(grad_kk), k_blk, input_precision=PRECISION)
        store_tile(dk + i_h * K, dk_blk, t0, rows, row_ok, H * K, k_rows, k_ok)
    # G_t = g_1 + ... + g_t within the chunk, so dg_t = sum_{s >= t} dG_s.
    d_gate = tl.sum(tl.where(rows[None, :] >= rows[:, None], d_cum[None, :], 0.0), 1)
    tl.store(dg + (t0 + rows) * H + i_h, tl.cast(d_gate, dg.dtype.element_ty), mask=row_ok)
    tl.store(d_beta + (t0 + rows) * H + i_h, tl.cast(d_b, d_beta.dtype.element_ty), mask=row_ok)
