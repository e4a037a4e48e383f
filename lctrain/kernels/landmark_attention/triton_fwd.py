"""Triton forward kernel of `landmark_attention`.

One program per (query tile of one document, head); a query tile is `BM` rows inside one landmark block b (blocks of
L = `block_size` tokens from each document start). For every earlier block c < b the program loads the whole
block as one key tile (`BN` >= L rows; column L - 1 is the landmark) and computes, per query row i,

    s_c(i) = s_{i, landmark(c)},   L_c(i) = logsumexp_{j in c, j not landmark} s_ij,
    A_c(i) = sum_{j in c, j not landmark} exp(s_ij - L_c(i)) v_j          (the block's value average),

and folds the pair (s_c(i), A_c(i)) into an online softmax over the query's group, as one element with score
s_c(i) and value A_c(i): the gate g_c(i) = exp(s_c(i) - M(i)) then weights the whole block. The own block adds
its non-landmark keys j <= i as ordinary elements. M(i), the group's log-sum-exp, is saved for the backward
pass; statistics and accumulators are fp32. Like full causal attention, every query visits every earlier key
(O(T^2) work in training); the landmarks make retrieval blockwise, not the training cost smaller.

Layouts (contiguous, packed): q, k `[T_total, H, D]`, v and o `[T_total, H, DV]`, lse `[T_total, H]` fp32,
cu_seqlens int32 `[N+1]`, tiles int32 `[NT, 2]`. D and DV are compile-time widths (powers of two >= 16; the
caller zero-pads heads), so whole rows load without column masks.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lctrain.kernels.addressing import split_row


@triton.jit
def load_rows(base, first, offs, valid, row_stride, W: tl.constexpr):
    """[len(offs), W] tile of rows `first + offs` of a `[T, row_stride]` view; rows not `valid` read as zeros.
    `first` (a scalar) is split by `split_row`: token * stride passes 2^31 in one long document, the tile's own
    offsets stay 32-bit. A whole row is valid or not, so the loads vectorise along it."""
    high, low = split_row(first)
    return tl.load(base + high * row_stride + (low + offs)[:, None] * row_stride + tl.arange(0, W)[None, :],
                   mask=valid[:, None], other=0.0)


@triton.jit
def query_tile(i_t, BLOCK, length, BM: tl.constexpr):
    """Query tile `i_t` (tiles of BM rows, cdiv(BLOCK, BM) per block): its block index b, the token offset of
    its first row, its in-block rows `[BM]`, their token offsets `[BM]` and which of them are real queries."""
    tiles = tl.cdiv(BLOCK, BM)
    b = i_t // tiles
    first_row = (i_t % tiles) * BM
    rows = first_row + tl.arange(0, BM)
    offs_m = b * BLOCK + rows
    return b, b * BLOCK + first_row, rows, offs_m, (rows < BLOCK) & (offs_m < length)


@triton.jit
def landmark_fwd_kernel(
    q, k, v, o, lse, cu_seqlens, tiles,
    scale, H, BLOCK,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
):
    # Grid: (query tile of some document, head). Axis 0 walks the tile table `tiles` ([NT, 2] int32: document,
    # query tile within it; see `lctrain.kernels.tiles`), so any number of documents and tokens fits CUDA's grid.
    i_h = tl.program_id(1)
    i_n = tl.load(tiles + 2 * tl.program_id(0))
    bos = tl.load(cu_seqlens + i_n)
    length = tl.load(cu_seqlens + i_n + 1) - bos
    b, start, rows, offs_m, valid_m = query_tile(tl.load(tiles + 2 * tl.program_id(0) + 1), BLOCK, length, BM)
    if start >= length:  # a short last block has fewer query tiles than the table lists
        return
    # 64-bit base pointers for this (sequence, head); token offsets widen in `load_rows` and below.
    bos64 = tl.cast(bos, tl.int64)
    q_seq = q + (bos64 * H + i_h) * D
    k_seq = k + (bos64 * H + i_h) * D
    v_seq = v + (bos64 * H + i_h) * DV
    row_tile = (bos64 + tl.cast(start, tl.int64)) * H + i_h  # the query tile's first row
    tile_m = tl.arange(0, BM)

    cols = tl.arange(0, BN)
    member = cols < BLOCK - 1  # non-landmark columns of a complete block
    is_landmark = cols == BLOCK - 1
    b_q = load_rows(q_seq, start, tile_m, valid_m, H * D, D)
    m_i = tl.full([BM], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, DV], dtype=tl.float32)
    # Loop steps are never the literal 1: ptxas compiles the exit of such a loop with a call and a stack frame.
    for block_start in range(0, b * BLOCK, BLOCK):
        # Earlier blocks are complete, so `offs_n < length` always holds here; it keeps the load masks
        # loop-dependent, so the compiler does not hoist them out of the loop into registers. The landmark's
        # value is never used and is not loaded.
        offs_n = block_start + cols
        b_k = load_rows(k_seq, block_start, cols, (cols < BLOCK) & (offs_n < length), H * D, D)
        b_v = load_rows(v_seq, block_start, cols, member & (offs_n < length), H * DV, DV)
        scores = tl.dot(b_q, tl.trans(b_k)) * scale
        gate_score = tl.sum(tl.where(is_landmark[None, :], scores, 0.0), axis=1)
        inner = tl.where(member[None, :], scores, float("-inf"))
        inner_max = tl.max(inner, axis=1)
        p = tl.exp(inner - inner_max[:, None])
        # A_c(i); the approximate division (no IEEE slow path, which costs a stack frame) is exact enough here
        average = tl.fdiv(tl.dot(p.to(b_v.dtype), b_v), tl.sum(p, axis=1)[:, None])
        m_new = tl.maximum(m_i, gate_score)
        alpha = tl.exp(m_i - m_new)
        gate = tl.exp(gate_score - m_new)
        l_i = l_i * alpha + gate
        acc = acc * alpha[:, None] + gate[:, None] * average
        m_i = m_new
    # Own block: non-landmark keys j <= i (column BLOCK - 1 exists only in a complete block, as its landmark).
    offs_n = b * BLOCK + cols
    b_k = load_rows(k_seq, b * BLOCK, cols, (cols < BLOCK) & (offs_n < length), H * D, D)
    b_v = load_rows(v_seq, b * BLOCK, cols, member & (offs_n < length), H * DV, DV)
    scores = tl.dot(b_q, tl.trans(b_k)) * scale
    own = (cols[None, :] <= rows[:, None]) & member[None, :]
    scores = tl.where(own, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v)
    m_i = m_new
    # Every group is non-empty (a landmark query still sees its block's first token), so l_i > 0 on valid rows.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(o + row_tile * DV + tile_m[:, None] * (H * DV) + tl.arange(0, DV)[None, :],
             tl.fdiv(acc, l_safe[:, None]), mask=valid_m[:, None])
    tl.store(lse + row_tile + tile_m * H, m_i + tl.log(l_safe), mask=valid_m)
