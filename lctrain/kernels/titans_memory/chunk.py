"""Chunked pure-PyTorch `titans_linear_memory`: the CPU training path (autograd by torch).

Inside a chunk (local index t = 0 .. C-1, entering memory M0 and momentum S0) every surprise uses M0, so the
errors of the whole chunk are one matmul, E = K M0 - V (`[C, V]`), and the two linear recurrences unroll with
the cumulative products A_t = eta_1 ... eta_t and B_t = (1-alpha_1) ... (1-alpha_t), taken in log space:

    R[s, j] = A_s / A_j   (j <= s)          momentum carried from token j to token s
    L[t, s] = B_t / B_s   (s <= t)          memory decay from token s to token t
    D = L @ R,  c = L @ A                   (D[t, j]: how much of surprise j is in M_t; c_t: how much of S0)

    S_t = A_t S0 - sum_j R[t, j] theta_j k_j e_j^T
    M_t = B_t M0 + c_t S0 - sum_j D[t, j] theta_j k_j e_j^T
    o_t = B_t q_t^T M0 + c_t q_t^T S0 - sum_j D[t, j] theta_j (q_t . k_j) e_j

Ratios are exp(difference of cumulative logs), masked before the exp, so nothing overflows. Gates at exactly 0
(eta = 0 or alpha = 1) are clamped to the smallest positive normal number before the log. Everything that does
not depend on M0 (the decay matrices, q k^T) is computed for all chunks at once; only E and the hand-off of
(M, S) run chunk after chunk. Packed documents (`cu_seqlens`) run one document at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lctrain.kernels.titans_memory.common import document_spans, state_dtype_for


def chunk_titans_linear_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    theta: torch.Tensor,
    chunk_size: int,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Chunked Titans linear memory (inputs already validated; shapes as in `naive_titans_linear_memory`).

    q, k `[B, T, H, K]`, v `[B, T, H, V]`, alpha/eta/theta `[B, T, H]`, initial_state `(M, S)` each
    `[N, H, K, V]` or None. Returns o `[B, T, H, V]` (q's dtype) and `(M, S)` (fp32, float64 for float64
    inputs) or None.
    """
    batch, length = q.shape[:2]
    if cu_seqlens is None:
        o, memory, momentum = _chunk_rows(q, k, v, alpha, eta, theta, chunk_size, initial_state)
    else:
        pieces, memories, momenta = [], [], []
        for n, (_, start, end) in enumerate(document_spans(cu_seqlens, batch, length)):
            entering = None if initial_state is None else (initial_state[0][n:n + 1], initial_state[1][n:n + 1])
            piece = slice(start, end)
            o_doc, m_doc, s_doc = _chunk_rows(q[:, piece], k[:, piece], v[:, piece], alpha[:, piece],
                                              eta[:, piece], theta[:, piece], chunk_size, entering)
            pieces.append(o_doc)
            memories.append(m_doc)
            momenta.append(s_doc)
        o, memory, momentum = torch.cat(pieces, dim=1), torch.cat(memories), torch.cat(momenta)
    if not output_final_state:
        return o, None
    dtype = state_dtype_for(q.dtype)
    return o, (memory.to(dtype), momentum.to(dtype))


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def _decay_matrix(cum: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """[..., C] inclusive cumulative logs -> [..., C, C] with exp(cum_t - cum_s) for s <= t, else 0."""
    gaps = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    return gaps.exp()


@dataclass
class ChunkCoefficients:
    """How the chunk-start state and each surprise enter every token's state, per chunk. Shapes `[B, H, n, C]`
    or `[B, H, n, C, C]` (row t = token, column j = surprise).

    keep_s0 = A_t, keep_m0 = B_t, s0_in_memory = c_t, in_memory = D[t, j] theta_j,
    momentum_weight = R[t, j] theta_j (see the module docstring)."""

    keep_s0: torch.Tensor
    keep_m0: torch.Tensor
    s0_in_memory: torch.Tensor
    in_memory: torch.Tensor
    momentum_weight: torch.Tensor


def chunk_coefficients(alpha: torch.Tensor, eta: torch.Tensor, theta: torch.Tensor, chunk_size: int,
                       compute: torch.dtype) -> ChunkCoefficients:
    """Coefficients of every chunk from gates `[B, L, H]` (L padded up to whole chunks with eta = 1, alpha = 0,
    theta = 0: padded tokens come after the real ones, so they never affect a real token)."""
    batch, length, heads = alpha.shape
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length

    def to_chunks(x: torch.Tensor) -> torch.Tensor:  # [B, L, H] -> [B, H, n, C]
        x = F.pad(x.to(compute), (0, 0, 0, pad))
        return x.view(batch, num_chunks, chunk_size, heads).permute(0, 3, 1, 2)

    cum_a = to_chunks(_safe_log(eta.to(compute))).cumsum(-1)  # log A_t
    cum_b = to_chunks(_safe_log(1 - alpha.to(compute))).cumsum(-1)  # log B_t
    theta_c = to_chunks(theta).unsqueeze(-2)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=alpha.device).tril()
    carry_momentum = _decay_matrix(cum_a, causal)  # R
    carry_memory = _decay_matrix(cum_b, causal)  # L
    keep_s0 = cum_a.exp()
    return ChunkCoefficients(
        keep_s0=keep_s0, keep_m0=cum_b.exp(),
        s0_in_memory=(carry_memory @ keep_s0.unsqueeze(-1)).squeeze(-1),
        in_memory=carry_memory @ carry_momentum * theta_c, momentum_weight=carry_momentum * theta_c)


def _chunk_rows(q, k, v, alpha, eta, theta, chunk_size, initial_state):
    """Chunked recurrence where every batch row is one sequence.

    q, k `[B, L, H, K]`, v `[B, L, H, V]`, gates `[B, L, H]`, initial_state `(M, S)` `[B, H, K, V]` or None.
    Returns o `[B, L, H, V]` (q's dtype) and the final M, S `[B, H, K, V]` (compute dtype).
    """
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    # bf16/fp16 inputs are computed in fp32 so the memory never rounds to half precision.
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if initial_state is None:
        memory = q.new_zeros(batch, heads, key_dim, value_dim, dtype=compute)
        momentum = torch.zeros_like(memory)
    else:
        memory, momentum = initial_state[0].to(compute), initial_state[1].to(compute)
    if length == 0:
        return v.new_zeros(batch, 0, heads, value_dim), memory, momentum
    chunk_size = max(1, min(chunk_size, length))
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # [B, L, H, D] -> [B, H, n, C, D]. Padded tokens sit after the last real one; outputs only look back
        # and the final state is read at the last real token, so their values never matter.
        x = F.pad(x.to(compute), (0, 0, 0, 0, 0, pad))
        return x.view(batch, num_chunks, chunk_size, heads, -1).permute(0, 3, 1, 2, 4)

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)
    coef = chunk_coefficients(alpha, eta, theta, chunk_size, compute)
    keep_s0, keep_m0, s0_in_memory = coef.keep_s0, coef.keep_m0, coef.s0_in_memory
    in_memory, momentum_weight = coef.in_memory, coef.momentum_weight
    qk_weighted = (qc @ kc.transpose(-1, -2)) * in_memory  # D[t, j] theta_j (q_t . k_j)

    outputs = []
    # unbind once: indexing [:, :, c] in the loop would give each chunk a full-size gradient buffer (O(T^2))
    q_all, k_all, v_all, qk_all = qc.unbind(2), kc.unbind(2), vc.unbind(2), qk_weighted.unbind(2)
    keep_m0_all, keep_s0_all = keep_m0.unbind(2), keep_s0.unbind(2)
    s0_mem_all, in_mem_all, mom_w_all = s0_in_memory.unbind(2), in_memory.unbind(2), momentum_weight.unbind(2)
    for c in range(num_chunks):
        last = min(chunk_size, length - c * chunk_size) - 1  # final state is read at the last real token
        q_c, k_c = q_all[c], k_all[c]
        error = k_c @ memory - v_all[c]  # E = K M0 - V, [B, H, C, V]
        outputs.append(keep_m0_all[c][..., None] * (q_c @ memory) + s0_mem_all[c][..., None] * (q_c @ momentum)
                       - qk_all[c] @ error)
        memory_update = (k_c * in_mem_all[c][:, :, last, :, None]).transpose(-1, -2) @ error
        momentum_update = (k_c * mom_w_all[c][:, :, last, :, None]).transpose(-1, -2) @ error
        memory, momentum = (keep_m0_all[c][:, :, last, None, None] * memory
                            + s0_mem_all[c][:, :, last, None, None] * momentum - memory_update,
                            keep_s0_all[c][:, :, last, None, None] * momentum - momentum_update)
    o = torch.stack(outputs, dim=2)  # [B, H, n, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(batch, num_chunks * chunk_size, heads, value_dim)[:, :length]
    return o.to(q.dtype), memory, momentum
