"""Chunked pure-PyTorch `taylor_linear_attention`: the CPU training path (autograd by torch).

Inside a chunk of C tokens the score is evaluated directly as the polynomial (a masked [C, C] matrix, no
feature expansion); across chunks the state S (`common.py`) carries everything before:

    y_i = sum_{j<=i in chunk} (1 + x_ij + x_ij^2 / 2) [v_j, 1]  +  phi_q(q_i)^T S_entering
    S  <- S + phi_k(K_chunk)^T [V_chunk, 1]

Packed documents (`cu_seqlens`) run one document at a time, each from its own initial state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lctrain.kernels.taylor_linear_attention.common import (
    document_spans,
    key_features,
    query_features,
    state_rows,
    with_ones,
)

DEFAULT_CHUNK_SIZE = 64


def chunk_taylor_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked Taylor linear attention (inputs already validated; shapes as in the naive reference).

    Returns y `[B, T, H, V+1]` and the final state `[N, H, F, V+1]` in the compute dtype (fp32, or float64 for
    float64 inputs).
    """
    batch, length, _, _ = q.shape
    if cu_seqlens is None:
        return _chunk_rows(q, k, v, scale, initial_state, chunk_size)
    pieces, finals = [], []
    for n, (_, start, end) in enumerate(document_spans(cu_seqlens, batch, length)):
        entering = None if initial_state is None else initial_state[n:n + 1]
        y_doc, final_doc = _chunk_rows(q[:, start:end], k[:, start:end], v[:, start:end], scale, entering,
                                       chunk_size)
        pieces.append(y_doc)
        finals.append(final_doc)
    return torch.cat(pieces, dim=1), torch.cat(finals, dim=0)


def _chunk_rows(q, k, v, scale, initial_state, chunk_size):
    """Every batch row is one sequence: q, k `[B, L, H, D]`, v `[B, L, H, V]`, initial_state `[B, H, F, V+1]`."""
    batch, length, heads, feature_dim = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    chunk_size = max(1, min(chunk_size, length))
    num_chunks = max(1, -(-length // chunk_size))
    pad = num_chunks * chunk_size - length

    def to_chunks(x):
        # [B, L, H, X] -> [B, H, n, C, X]; padded tokens have k = 0 and [v, 1] = 0, so they add nothing.
        x = F.pad(x.to(compute), (0, 0, 0, 0, 0, pad))
        return x.view(batch, num_chunks, chunk_size, heads, -1).permute(0, 3, 1, 2, 4)

    qc, kc = to_chunks(q), to_chunks(k)
    vc = to_chunks(with_ones(v.to(compute)))  # the ones of padded tokens are zeroed by the padding
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    x = (qc @ kc.transpose(-1, -2)) * scale
    scores = (1 + x + 0.5 * x * x).masked_fill(~causal, 0.0)
    y = scores @ vc  # [B, H, n, C, V+1]

    phi_q, phi_k = query_features(qc, scale), key_features(kc)  # [B, H, n, C, F]
    if initial_state is None:
        state = qc.new_zeros(batch, heads, state_rows(feature_dim), vc.shape[-1])
    else:
        state = initial_state.to(compute)
    inter = []
    # unbind once: indexing [:, :, c] in the loop would give each chunk a full-size gradient buffer (O(T^2))
    q_chunks, k_chunks, v_chunks = phi_q.unbind(2), phi_k.unbind(2), vc.unbind(2)
    for c in range(num_chunks):
        inter.append(q_chunks[c] @ state)
        state = state + k_chunks[c].transpose(-1, -2) @ v_chunks[c]
    y = y + torch.stack(inter, dim=2)
    y = y.permute(0, 2, 3, 1, 4).reshape(batch, num_chunks * chunk_size, heads, -1)[:, :length]
    return y, state
