"""Token-by-token reference for `linear_attention`, computed in float64: the ground truth for every test.

    S_t = exp(g_t) * S_{t-1} + k_t v_t^T          (S: [K, V] per head)
    o_t = scale * q_t^T S_t

Slow (a Python loop over tokens) but obviously right; autograd runs through it.
"""
from __future__ import annotations

import torch

from lctrain.kernels.linear_attention.common import document_spans, per_token_log_decay, state_dtype_for


def naive_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent linear attention with optional decay (inputs already validated).

    Args:
        q, k: `[B, T, H, K]`.  v: `[B, T, H, V]`.
        log_decay: None, `[H]` or `[B, T, H]`, values <= 0.
        scale: multiplies every output.
        initial_state: `[N, H, K, V]` or None (zeros).
        output_final_state: return the state after each sequence's last token.
        cu_seqlens: int `[N+1]` document offsets into the T axis (B == 1), or None (N = B).

    Returns:
        o `[B, T, H, V]` in q's dtype, and the final state `[N, H, K, V]` (float32; float64 for float64
        inputs) or None.
    """
    batch, length, heads, _ = q.shape
    g = per_token_log_decay(log_decay, batch, length, heads)
    q64, k64, v64 = q.double(), k.double(), v.double()
    outputs: list[torch.Tensor | None] = [None] * batch
    row_pieces: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    final_states = []
    for n, (row, start, end) in enumerate(document_spans(cu_seqlens, batch, length)):
        if initial_state is None:
            state = q64.new_zeros(heads, q.shape[-1], v.shape[-1])
        else:
            state = initial_state[n].double()
        for t in range(start, end):
            if g is not None:
                state = g[row, t].double().exp()[:, None, None] * state
            state = state + k64[row, t, :, :, None] * v64[row, t, :, None, :]
            row_pieces[row].append(torch.einsum("hk,hkv->hv", q64[row, t], state) * scale)
        final_states.append(state)
    for row in range(batch):
        outputs[row] = torch.stack(row_pieces[row], dim=0) if row_pieces[row] else v64.new_zeros(0, heads, v.shape[-1])
    o = torch.stack(outputs, dim=0).to(q.dtype)
    if not output_final_state:
        return o, None
    return o, torch.stack(final_states, dim=0).to(state_dtype_for(q.dtype))
