"""Triton forward kernels of the chunked Gated DeltaNet (WY/UT form; equations in `chunk.py`).

Four launches, log-space gates. Matrix products take their operands in the q/k/v element type E (bf16 and
fp16 inputs run bf16/fp16 tensor-core dots, never TF32) and accumulate in fp32; fp32 intermediates (decayed
rows, the inverse, the state) are cast to E just before a product, as the per-chunk tensors the forward saves
(A, Aqk, W, U, delta and the entering states) are stored in E. Recurrent states and accumulators stay fp32.
  1. `gdn_fwd_inverse_kernel` (one program per chunk x head): cumulative gates G, the masked q.k product
     Aqk = scale (Q K^T * exp(G_t - G_j)) and A = (I + L)^-1 (16 x 16 diagonal blocks by forward
     substitution, then merged with products); then
     `gdn_fwd_wu_kernel` (same grid): W = A diag(beta e^G) K, U = A diag(beta) V.
  2. `gdn_fwd_state_kernel`    (one program per sequence x head x V-block): walks the chunks in order,
     storing each chunk's entering state and delta = U - W S.
  3. `gdn_fwd_output_kernel`   (one program per chunk x V-block x head): o = scale e^G Q S + Aqk delta.

Tokens are addressed through `cu_seqlens` (equal-length batches pass arange offsets), so packed documents
need no padding copies and the sequence length is never a compile-time constant. Chunks are listed by
`chunk_indices` `[NT, 2]` (sequence id, chunk number within it) and a sequence's first chunk is
`chunk_offsets[n]`.
"""
import triton
import triton.language as tl

SUB = tl.constexpr(16)  # diagonal block of the chunk inverse: the smallest tl.dot operand


@triton.jit
def chunk_span(cu_seqlens, chunk_indices, i_c, BT: tl.constexpr):
    """(sequence id, first token of chunk i_c, end of its sequence), tokens as int64."""
    i_n = tl.load(chunk_indices + i_c * 2)
    local = tl.load(chunk_indices + i_c * 2 + 1)
    bos = tl.cast(tl.load(cu_seqlens + i_n), tl.int64)
    eos = tl.cast(tl.load(cu_seqlens + i_n + 1), tl.int64)
    return i_n, bos + tl.cast(local, tl.int64) * BT, eos


@triton.jit
def load_raw(ptr, t0, rows, row_ok, row_stride, cols, col_ok):
    """Tile ptr[(t0 + rows) * row_stride + cols] in ptr's element type, zero where masked (a dot operand)."""
    offs = (t0 + rows)[:, None] * row_stride + cols[None, :]
    return tl.load(ptr + offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def load_tile(ptr, t0, rows, row_ok, row_stride, cols, col_ok):
    """fp32 tile ptr[(t0 + rows) * row_stride + cols], zero where masked. Shape [len(rows), len(cols)]."""
    return tl.cast(load_raw(ptr, t0, rows, row_ok, row_stride, cols, col_ok), tl.float32)


@triton.jit
def store_tile(ptr, value, t0, rows, row_ok, row_stride, cols, col_ok):
    """ptr[(t0 + rows) * row_stride + cols] = value (cast to ptr's type) where unmasked."""
    offs = (t0 + rows)[:, None] * row_stride + cols[None, :]
    tl.store(ptr + offs, tl.cast(value, ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def gdn_fwd_inverse_kernel(q, k, g, beta, cum_gate, a_inv, a_qk, cu_seqlens, chunk_indices, scale, H, K,
                           BT: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """Per chunk x head. q, k `[T, H, K]`, g, beta `[T, H]` (T = all packed tokens).

    Writes cum_gate `[T, H]` fp32, a_inv and a_qk `[T, H, BT]` (row t of its chunk's C x C matrix) in q's type.
    """
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    _, t0, eos = chunk_span(cu_seqlens, chunk_indices, i_c, BT)
    rows = tl.arange(0, BT)
    row_ok = rows < eos - t0
    all_cols = rows < BT
    gate = tl.cast(tl.load(g + (t0 + rows) * H + i_h, mask=row_ok, other=0.0), tl.float32)
    b = tl.cast(tl.load(beta + (t0 + rows) * H + i_h, mask=row_ok, other=0.0), tl.float32)
    causal = rows[:, None] >= rows[None, :]
    # G_t = sum_{j <= t} g_j as a masked row sum (same result compiled and interpreted).
    cum = tl.sum(tl.where(causal, gate[None, :], 0.0), 1)
    tl.store(cum_gate + (t0 + rows) * H + i_h, cum, mask=row_ok)

    kk = tl.zeros([BT, BT], dtype=tl.float32)
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols = i_k * BK + tl.arange(0, BK)
        col_ok = cols < K
        k_blk = load_raw(k + i_h * K, t0, rows, row_ok, H * K, cols, col_ok)
        q_blk = load_raw(q + i_h * K, t0, rows, row_ok, H * K, cols, col_ok)
        kk += tl.dot(k_blk, tl.trans(k_blk), input_precision=PRECISION)
        qk += tl.dot(q_blk, tl.trans(k_blk), input_precision=PRECISION)

    pair_ok = row_ok[:, None] & row_ok[None, :]
    # Mask before exp: above the diagonal G_t - G_j >= 0 may overflow; padded rows would too.
    decay = tl.exp(tl.where(causal & pair_ok, cum[:, None] - cum[None, :], float("-inf")))
    store_tile(a_qk + i_h * BT, qk * decay * scale, t0, rows, row_ok, H * BT, rows, all_cols)

    # A = (I + L)^-1 with L strictly lower, in two steps. (1) The SUB x SUB diagonal blocks D = I + L_d by
    # forward substitution: row i of D^-1 - I satisfies M_i = -L_i + sum_{j<i} (-L_ij) M_j, so rows are
    # finished top to bottom, the same row of every block at once (SUB - 1 steps; the blocks do not touch,
    # so the column sums below pick up one block each). (2) With E the blocks below the diagonal,
    # I + L = D (I + N), N = D^-1 E strictly block-lower, so N^4 = 0 and A = (I - N)(I + N^2) D^-1.
    tl.static_assert(BT <= 4 * SUB)
    neg_l = tl.where(rows[:, None] > rows[None, :], -(b[:, None] * kk * decay), 0.0)
    same_block = (rows[:, None] // SUB) == (rows[None, :] // SUB)
    inv = tl.where(same_block, neg_l, 0.0)
    for i in range(1, SUB):
        is_row = (rows % SUB == i)[:, None]
        row = tl.sum(tl.where(is_row, inv, 0.0), 0)
        row = row + tl.sum(row[:, None] * inv, 0)
        inv = tl.where(is_row & same_block, row[None, :], inv)
    inv += tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    # Products in k's type, like every product of the chunk (A itself is stored in it).
    d_inv = tl.cast(inv, k.dtype.element_ty)
    n_blk = tl.dot(d_inv, tl.cast(tl.where(same_block, 0.0, -neg_l), d_inv.dtype), input_precision=PRECISION)
    n_blk = tl.cast(n_blk, d_inv.dtype)
    n_sq = tl.cast(tl.dot(n_blk, n_blk, input_precision=PRECISION), d_inv.dtype)
    inv += tl.dot(n_sq, d_inv, input_precision=PRECISION)  # (I + N^2) D^-1
    inv -= tl.dot(n_blk, tl.cast(inv, d_inv.dtype), input_precision=PRECISION)
    store_tile(a_inv + i_h * BT, inv, t0, rows, row_ok, H * BT, rows, all_cols)


@triton.jit
def gdn_fwd_wu_kernel(k, v, beta, cum_gate, a_inv, w, u, cu_seqlens, chunk_indices, H, K, V, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """Per chunk x head: w `[T, H, K]` = A diag(beta e^G) K and u `[T, H, V]` = A diag(beta) V (k's type).

    A separate launch from the inversion: nothing has to stay live across the substitution loop.
    """
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    _, t0, eos = chunk_span(cu_seqlens, chunk_indices, i_c, BT)
    rows = tl.arange(0, BT)
    row_ok = rows < eos - t0
    b = tl.cast(tl.load(beta + (t0 + rows) * H + i_h, mask=row_ok, other=0.0), tl.float32)
    cum = tl.load(cum_gate + (t0 + rows) * H + i_h, mask=row_ok, other=0.0)
    inv = load_raw(a_inv + i_h * BT, t0, rows, row_ok, H * BT, rows, rows < BT)
    k_weight = b * tl.exp(cum)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols = i_k * BK + tl.arange(0, BK)
        col_ok = cols < K
        k_blk = load_tile(k + i_h * K, t0, rows, row_ok, H * K, cols, col_ok)
        w_blk = tl.dot(inv, tl.cast(k_blk * k_weight[:, None], inv.dtype), input_precision=PRECISION)
        store_tile(w + i_h * K, w_blk, t0, rows, row_ok, H * K, cols, col_ok)
    for i_v in range(0, tl.cdiv(V, BV)):
        cols = i_v * BV + tl.arange(0, BV)
        col_ok = cols < V
        v_blk = load_tile(v + i_h * V, t0, rows, row_ok, H * V, cols, col_ok)
        u_blk = tl.dot(inv, tl.cast(v_blk * b[:, None], inv.dtype), input_precision=PRECISION)
        store_tile(u + i_h * V, u_blk, t0, rows, row_ok, H * V, cols, col_ok)


@triton.jit
def gdn_fwd_state_kernel(k, w, u, cum_gate, initial_state, chunk_states, delta, final_state, cu_seqlens,
                         chunk_offsets, H, K, V, BT: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, HAS_INITIAL: tl.constexpr,
                         STORE_FINAL: tl.constexpr, PRECISION: tl.constexpr):
    """Per sequence x head (axis 0) and V-block (axis 1); BK covers all of K.

    k, w `[T, H, K]`, u `[T, H, V]`, cum_gate `[T, H]`; initial/final state `[N, H, K, V]`. Writes
    chunk_states `[NT, H, K, V]` (state entering each chunk) and delta `[T, H, V]` (= U - W S) in k's type;
    the state itself is carried in fp32.
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

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INITIAL:
        state += tl.load(initial_state + head_state + state_offs, mask=state_mask, other=0.0)
    for c in range(0, num_chunks):
        t0 = bos + c * BT
        row_ok = rows < eos - t0
        chunk_head = ((first_chunk + c) * H + i_h) * K * V
        # The stored state is the one the products below use (rounded to k's type), so the backward, which
        # reads it back, differentiates exactly what ran.
        state_e = tl.cast(state, k.dtype.element_ty)
        tl.store(chunk_states + chunk_head + state_offs, state_e, mask=state_mask)
        w_blk = load_raw(w + i_h * K, t0, rows, row_ok, H * K, k_rows, k_ok)
        u_blk = load_tile(u + i_h * V, t0, rows, row_ok, H * V, cols, col_ok)
        d_blk = u_blk - tl.dot(w_blk, state_e, input_precision=PRECISION)
        store_tile(delta + i_h * V, d_blk, t0, rows, row_ok, H * V, cols, col_ok)
        cum = tl.load(cum_gate + (t0 + rows) * H + i_h, mask=row_ok, other=0.0)
        last = tl.minimum(eos - t0, BT) - 1
        cum_last = tl.load(cum_gate + (t0 + last) * H + i_h)
        k_blk = load_raw(k + i_h * K, t0, rows, row_ok, H * K, k_rows, k_ok)
        # S_C = e^{G_C} S_0 + sum_j e^{G_C - G_j} k_j delta_j^T; padded rows have k = 0. The decay scales
        # delta's rows (fp32) so that k enters the product unrounded.
        d_blk = d_blk * tl.exp(cum_last - cum)[:, None]
        state = state * tl.exp(cum_last) + tl.dot(tl.trans(k_blk), tl.cast(d_blk, k_blk.dtype),
                                                  input_precision=PRECISION)
    if STORE_FINAL:
        tl.store(final_state + head_state + state_offs, state, mask=state_mask)


@triton.jit
def gdn_fwd_output_kernel(q, cum_gate, a_qk, delta, chunk_states, o, cu_seqlens, chunk_indices, scale, H,
                          K, V, BT: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, PRECISION: tl.constexpr):
    """Per chunk (axis 0) x V-block (axis 1) x head (axis 2): o `[T, H, V]` = scale e^G Q S_0 + Aqk delta."""
    i_c = tl.program_id(0)
    i_v = tl.program_id(1)
    i_h = tl.program_id(2)
    _, t0, eos = chunk_span(cu_seqlens, chunk_indices, i_c, BT)
    rows = tl.arange(0, BT)
    row_ok = rows < eos - t0
    cols = i_v * BV + tl.arange(0, BV)
    col_ok = cols < V
    chunk_head = (tl.cast(i_c, tl.int64) * H + i_h) * K * V
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        k_rows = i_k * BK + tl.arange(0, BK)
        k_ok = k_rows < K
        q_blk = load_raw(q + i_h * K, t0, rows, row_ok, H * K, k_rows, k_ok)
        s_blk = load_raw(chunk_states + chunk_head, 0, k_rows, k_ok, V, cols, col_ok)
        acc += tl.dot(q_blk, s_blk, input_precision=PRECISION)
    cum = tl.load(cum_gate + (t0 + rows) * H + i_h, mask=row_ok, other=0.0)
    acc = acc * (scale * tl.exp(cum))[:, None]
    aqk = load_raw(a_qk + i_h * BT, t0, rows, row_ok, H * BT, rows, rows < BT)
    d_blk = load_raw(delta + i_h * V, t0, rows, row_ok, H * V, cols, col_ok)
    acc += tl.dot(aqk, d_blk, input_precision=PRECISION)
    store_tile(o + i_h * V, acc, t0, rows, row_ok, H * V, cols, col_ok)
