"""Token-by-token reference for `titans_linear_memory`, computed in float64: the ground truth for every test.

Per head, memory M `[K, V]` and momentum S `[K, V]`. Inside each chunk of `chunk_size` tokens (counted from the
start of every sequence) the surprise is taken against the memory M0 at the chunk start:

    e_t = M0^T k_t - v_t                      (prediction error, [V])
    u_t = k_t e_t^T                           (gradient of 1/2 ||k_t^T M - v_t^T||^2 at M = M0)
    S_t = eta_t S_{t-1} - theta_t u_t         (momentum: past surprise decays, new surprise enters)
    M_t = (1 - alpha_t) M_{t-1} + S_t         (forgetting gate alpha)
    o_t = q_t^T M_t

With chunk_size == 1, M0 = M_{t-1}: the fully sequential online-gradient update.
"""
from __future__ import annotations

import torch

from lctrain.kernels.titans_memory.common import document_spans, state_dtype_for


def naive_titans_linear_memory(
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
    """Recurrent Titans linear memory (inputs already validated).

    Args:
        q, k: `[B, T, H, K]`.  v: `[B, T, H, V]`.  alpha, eta, theta: `[B, T, H]` in [0, 1].
        chunk_size: tokens that share one chunk-start memory M0.
        initial_state: `(M, S)`, each `[N, H, K, V]`, or None (zeros).
        output_final_state: also return `(M, S)` after each sequence's last token.
        cu_seqlens: int `[N+1]` document offsets into the T axis (B == 1), or None (N = B).

    Returns:
        o `[B, T, H, V]` in q's dtype, and `(M, S)` each `[N, H, K, V]` (float32; float64 for float64 inputs)
        or None.
    """
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    q64, k64, v64 = q.double(), k.double(), v.double()
    a64, e64, th64 = alpha.double(), eta.double(), theta.double()
    rows: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    finals_m, finals_s = [], []
    for n, (row, start, end) in enumerate(document_spans(cu_seqlens, batch, length)):
        if initial_state is None:
            memory = q64.new_zeros(heads, key_dim, value_dim)
            momentum = q64.new_zeros(heads, key_dim, value_dim)
        else:
            memory, momentum = initial_state[0][n].double(), initial_state[1][n].double()
        chunk_start_memory = memory
        for t in range(start, end):
            if (t - start) % chunk_size == 0:
                chunk_start_memory = memory
            error = torch.einsum("hk,hkv->hv", k64[row, t], chunk_start_memory) - v64[row, t]
            surprise = k64[row, t, :, :, None] * error[:, None, :]
            momentum = e64[row, t, :, None, None] * momentum - th64[row, t, :, None, None] * surprise
            memory = (1 - a64[row, t, :, None, None]) * memory + momentum
            rows[row].append(torch.einsum("hk,hkv->hv", q64[row, t], memory))
        finals_m.append(memory)
        finals_s.append(momentum)
    o = torch.stack([torch.stack(r, dim=0) if r else v64.new_zeros(0, heads, value_dim) for r in rows], dim=0)
    o = o.to(q.dtype)
    if not output_final_state:
        return o, None
    dtype = state_dtype_for(q.dtype)
    return o, (torch.stack(finals_m, dim=0).to(dtype), torch.stack(finals_s, dim=0).to(dtype))
