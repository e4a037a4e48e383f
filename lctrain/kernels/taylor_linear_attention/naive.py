"""Token-by-token reference for `taylor_linear_attention` in float64: the ground truth for every test.

    S_t = S_{t-1} + phi_k(k_t) [v_t, 1]^T          y_t = phi_q(q_t)^T S_t       (see `common.py`)

y_t holds the numerator sum_{s<=t} score(q_t, k_s) v_s in its first V columns and the normaliser
sum_{s<=t} score(q_t, k_s) in the last; the public op divides them.
"""
from __future__ import annotations

import torch

from lctrain.kernels.taylor_linear_attention.common import (
    document_spans,
    key_features,
    query_features,
    state_rows,
    with_ones,
)


def naive_taylor_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent Taylor linear attention (inputs already validated).

    Args:
        q, k: `[B, T, H, D]`.  v: `[B, T, H, V]`.
        scale: x = scale * q.k inside the score.
        initial_state: `[N, H, F, V+1]` or None (zeros).
        cu_seqlens: int `[N+1]` document offsets (B == 1) or None (N = B).

    Returns:
        y `[B, T, H, V+1]` (numerator | normaliser) and the final state `[N, H, F, V+1]`, both float64.
    """
    batch, length, heads, feature_dim = q.shape
    phi_q = query_features(q.double(), scale)  # [B, T, H, F]
    phi_k = key_features(k.double())
    values = with_ones(v.double())  # [B, T, H, V+1]
    rows: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    finals = []
    for n, (row, start, end) in enumerate(document_spans(cu_seqlens, batch, length)):
        if initial_state is None:
            state = values.new_zeros(heads, state_rows(feature_dim), values.shape[-1])
        else:
            state = initial_state[n].double()
        for t in range(start, end):
            state = state + phi_k[row, t, :, :, None] * values[row, t, :, None, :]
            rows[row].append(torch.einsum("hf,hfv->hv", phi_q[row, t], state))
        finals.append(state)
    y = torch.stack([torch.stack(pieces) if pieces else values.new_zeros(0, heads, values.shape[-1])
                     for pieces in rows])
    return y, torch.stack(finals)
