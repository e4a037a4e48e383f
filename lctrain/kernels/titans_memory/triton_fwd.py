"""Triton forward kernels of `titans_linear_memory` (chunked form; equations in `chunk.py`).

Per chunk, with local tokens t = 0 .. C-1, A_t = eta_1..eta_t, B_t = (1-alpha_1)..(1-alpha_t) (cumulative
logs), R[t, j] = A_t / A_j, L[t, s] = B_t / B_s, D = L R, c = L A and the chunk's last real token C:

    E   = K M0 - V
    o   = diag(B) Q M0 + diag(c) Q S0 - ((Q K^T) * D diag(theta)) E
    M_C = B_C M0 + c_C S0 - K^T diag(D[C] theta) E,   S_C = A_C S0 - K^T diag(R[C] theta) E

  1. `titans_fwd_state_kernel` (sequence x head x V block) walks the chunks in order with M and S (`[K, BV]`
     fp32) in registers and stores the (M, S) entering every chunk. It needs only the last rows D[C], R[C],
     which are vectors, so no C x C matrix stays live across the walk.
  2. `titans_fwd_output_kernel` (chunk x head x V block) forms o from the stored (M0, S0), looping over K.
The update is independent per value column (E = K M0 - V and every later step act column by column), so
splitting V over programs is exact. Tokens are addressed through `cu_seqlens`; chunks restart at every
sequence start and a sequence's first chunk is `chunk_offsets[n]` (`chunk_indices` `[NT, 2]` lists
(sequence, chunk number) per chunk). `chunk_size` (the op's semantic chunk) is a runtime value <= BT.
"""
import triton
import triton.language as tl

# Smallest positive normal fp32: gates at exactly 0 (eta = 0, alpha = 1) are clamped to it before the log.
TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def load_tile(ptr, t0, rows, row_ok, row_stride, cols, col_ok):
    """fp32 tile ptr[(t0 + rows) * row_stride + cols], zero where masked. Shape [len(rows), len(cols)]."""
    offs = (t0 + rows)[:, None] * row_stride + cols[None, :]
    return tl.cast(tl.load(ptr + offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0), tl.float32)


@triton.jit
def store_tile(ptr, value, t0, rows, row_ok, row_stride, cols, col_ok):
    """ptr[(t0 + rows) * row_stride + cols] = value (cast to ptr's type) where unmasked."""
    offs = (t0 + rows)[:, None] * row_stride + cols[None, :]
    tl.store(ptr + offs, tl.cast(value, ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def chunk_gates(alpha, eta, theta, t0, rows, row_ok, H):
    """Gates of one chunk (pointers already offset to the head): (1 - alpha), eta, theta `[BT]` and the
    inclusive cumulative logs of the first two. Rows past the chunk read as alpha = 0, eta = 1, theta = 0."""
    offs = (t0 + rows) * H
    keep = 1.0 - tl.load(alpha + offs, mask=row_ok, other=0.0)
    decay = tl.load(eta + offs, mask=row_ok, other=1.0)
    rate = tl.load(theta + offs, mask=row_ok, other=0.0)
    cum_keep = tl.cumsum(tl.log(tl.maximum(keep, TINY)), axis=0)
    cum_decay = tl.cumsum(tl.log(tl.maximum(decay, TINY)), axis=0)
    return keep, decay, rate, cum_keep, cum_decay


@triton.jit
def chunk_mixing(cum_keep, cum_decay, rows, PRECISION: tl.constexpr):
    """(R, L, D = L R) `[BT, BT]` and (A, B, c = L A) `[BT]` from the cumulative logs. The exponent is masked
    before the exp, so the upper triangle never evaluates exp of a positive number."""
    causal = rows[:, None] >= rows[None, :]
    carry_momentum = tl.exp(tl.where(causal, cum_decay[:, None] - cum_decay[None, :], float("-inf")))
    carry_memory = tl.exp(tl.where(causal, cum_keep[:, None] - cum_keep[None, :], float("-inf")))
    in_memory = tl.dot(carry_memory, carry_momentum, input_precision=PRECISION)
    keep_s0 = tl.exp(cum_decay)
    keep_m0 = tl.exp(cum_keep)
    s0_in_memory = tl.sum(carry_memory * keep_s0[None, :], axis=1)
    return carry_momentum, carry_memory, in_memory, keep_s0, keep_m0, s0_in_memory


@triton.jit
def row_of(matrix, is_row):
    """Row `is_row` (a one-hot `[BT]` mask) of a `[BT, BT]` matrix, as a `[BT]` vector over its columns."""
    return tl.sum(tl.where(is_row[:, None], matrix, 0.0), axis=0)


@triton.jit
def entry_of(vector, is_row):
    return tl.sum(tl.where(is_row, vector, 0.0), axis=0)


@triton.jit
def chunk_handoff(cum_keep, cum_decay, rate, rows, row_ok, is_last):
    """How the chunk hands its state on: (D[C] theta, R[C] theta) `[BT]` and (B_C, c_C, A_C) scalars.

    D[C, j] = sum_{j <= s <= C} exp(cum_keep_C - cum_keep_s + cum_decay_s - cum_decay_j), a column sum of
    a transient matrix (no dot), with every exponent <= 0."""
    keep_last = entry_of(cum_keep, is_last)
    decay_last = entry_of(cum_decay, is_last)
    from_row = keep_last - cum_keep + cum_decay  # per s
    paths = (rows[:, None] >= rows[None, :]) & row_ok[:, None]
    last_mix = tl.sum(tl.exp(tl.where(paths, from_row[:, None] - cum_decay[None, :], float("-inf"))), axis=0)
    last_carry = tl.exp(tl.where(row_ok, decay_last - cum_decay, float("-inf")))
    s0_last = tl.sum(tl.exp(tl.where(row_ok, from_row, float("-inf"))), axis=0)
    return last_mix * rate, last_carry * rate, tl.exp(keep_last), s0_last, tl.exp(decay_last)


@triton.jit
def chunk_position(cu_seqlens, chunk_indices, i_t, chunk_size):
    """(first token, token count) of chunk i_t, as int64 / int64."""
    i_n = tl.load(chunk_indices + i_t * 2)
    local = tl.cast(tl.load(chunk_indices + i_t * 2 + 1), tl.int64)
    bos = tl.cast(tl.load(cu_seqlens + i_n), tl.int64)
    eos = tl.cast(tl.load(cu_seqlens + i_n + 1), tl.int64)
    t0 = bos + local * chunk_size
    return t0, tl.minimum(eos - t0, chunk_size)


@triton.jit
def titans_fwd_state_kernel(k, v, alpha, eta, theta, initial_memory, initial_momentum,
                            chunk_memory, chunk_momentum, final_memory, final_momentum,
                            cu_seqlens, chunk_offsets, chunk_size, H, K, V,
                            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_INITIAL: tl.constexpr,
                            PRECISION: tl.constexpr):
    """Per sequence x head (axis 0) and V block (axis 1); BK covers all of K.

    k `[T, H, K]`, v `[T, H, V]`, gates `[T, H]` fp32, initial/final states `[N, H, K, V]` fp32,
    chunk_memory/chunk_momentum `[NT, H, K, V]` fp32 (the state entering every chunk).
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
    if HAS_INITIAL:
        memory = tl.load(initial_memory + head_state + state_offs, mask=state_mask, other=0.0)
        momentum = tl.load(initial_momentum + head_state + state_offs, mask=state_mask, other=0.0)
    else:
        memory = tl.zeros([BK, BV], dtype=tl.float32)
        momentum = tl.zeros([BK, BV], dtype=tl.float32)
    for i_c in range(0, num_chunks):
        t0 = bos + i_c * chunk_size
        count = tl.minimum(eos - t0, chunk_size)
        row_ok = rows < count
        is_last = rows == count - 1
        chunk_head = ((first_chunk + i_c) * H + i_h) * K * V
        tl.store(chunk_memory + chunk_head + state_offs, memory, mask=state_mask)
        tl.store(chunk_momentum + chunk_head + state_offs, momentum, mask=state_mask)
        _, _, rate, cum_keep, cum_decay = chunk_gates(alpha + i_h, eta + i_h, theta + i_h, t0, rows, row_ok, H)
        last_mix, last_carry, keep_m_last, s0_last, keep_s_last = chunk_handoff(
            cum_keep, cum_decay, rate, rows, row_ok, is_last)
        k_blk = load_tile(k + i_h * K, t0, rows, row_ok, H * K, k_cols, k_ok)
        v_blk = load_tile(v + i_h * V, t0, rows, row_ok, H * V, v_cols, v_ok)
        error = tl.dot(k_blk, memory, input_precision=PRECISION) - v_blk  # E = K M0 - V
        next_memory = keep_m_last * memory + s0_last * momentum
        next_memory -= tl.dot(tl.trans(k_blk * last_mix[:, None]), error, input_precision=PRECISION)
        momentum = keep_s_last * momentum
        momentum -= tl.dot(tl.trans(k_blk * last_carry[:, None]), error, input_precision=PRECISION)
        memory = next_memory
    tl.store(final_memory + head_state + state_offs, memory, mask=state_mask)
    tl.store(final_momentum + head_state + state_offs, momentum, mask=state_mask)


@triton.jit
def titans_fwd_output_kernel(q, k, v, alpha, eta, theta, chunk_memory, chunk_momentum, o,
                             cu_seqlens, chunk_indices, chunk_size, H, K, V,
                             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """Per chunk (axis 0), head (axis 1) and V block (axis 2); loops over K in blocks of BK. Writes o
    `[T, H, V]` (q's dtype)."""
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    t0, count = chunk_position(cu_seqlens, chunk_indices, i_t, chunk_size)
    rows = tl.arange(0, BT)
    row_ok = rows < count
    v_cols = i_v * BV + tl.arange(0, BV)
    v_ok = v_cols < V
    chunk_head = (tl.cast(i_t, tl.int64) * H + i_h) * K * V
    _, _, rate, cum_keep, cum_decay = chunk_gates(alpha + i_h, eta + i_h, theta + i_h, t0, rows, row_ok, H)
    _, _, in_memory, _, keep_m0, s0_in_memory = chunk_mixing(cum_keep, cum_decay, rows, PRECISION)
    error = -load_tile(v + i_h * V, t0, rows, row_ok, H * V, v_cols, v_ok)
    out = tl.zeros([BT, BV], dtype=tl.float32)
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        k_cols = i_k * BK + tl.arange(0, BK)
        k_ok = k_cols < K
        state_offs = k_cols[:, None] * V + v_cols[None, :]
        state_mask = k_ok[:, None] & v_ok[None, :]
        q_blk = load_tile(q + i_h * K, t0, rows, row_ok, H * K, k_cols, k_ok)
        k_blk = load_tile(k + i_h * K, t0, rows, row_ok, H * K, k_cols, k_ok)
        memory = tl.load(chunk_memory + chunk_head + state_offs, mask=state_mask, other=0.0)
        momentum = tl.load(chunk_momentum + chunk_head + state_offs, mask=state_mask, other=0.0)
        error += tl.dot(k_blk, memory, input_precision=PRECISION)
        out += keep_m0[:, None] * tl.dot(q_blk, memory, input_precision=PRECISION)
        out += s0_in_memory[:, None] * tl.dot(q_blk, momentum, input_precision=PRECISION)
        qk += tl.dot(q_blk, tl.trans(k_blk), input_precision=PRECISION)
    out -= tl.dot(qk * in_memory * rate[None, :], error, input_precision=PRECISION)
    store_tile(o + i_h * V, out, t0, rows, row_ok, H * V, v_cols, v_ok)
