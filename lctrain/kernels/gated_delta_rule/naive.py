"""Token-by-token Gated DeltaNet recurrence: the ground truth the chunked forms are checked against.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = scale * q_t^T S_t

It computes in float64 when given float64 (autograd through it is fine) and in float32 otherwise.
"""
from __future__ import annotations

import torch


def _sequence_recurrence(q, k, v, g, beta, scale, state):
    """Run one sequence. q, k `[T, H, K]`, v `[T, H, V]`, g, beta `[T, H]`, state `[H, K, V]`.

    Returns o `[T, H, V]` and the final state `[H, K, V]`.
    """
    outputs = []
    for t in range(q.shape[0]):
        k_t, v_t, beta_t = k[t], v[t], beta[t]
        decayed = torch.exp(g[t])[:, None, None] * state
        # (I - beta k k^T) S = S - beta k (k^T S): never builds the K x K matrix.
        removed = torch.einsum("hk,hkv->hv", k_t, decayed)
        state = decayed + beta_t[:, None, None] * k_t[:, :, None] * (v_t - removed)[:, None, :]
        outputs.append(scale * torch.einsum("hk,hkv->hv", q[t], state))
    out = torch.stack(outputs) if outputs else v.new_zeros(v.shape)
    return out, state


def naive_gated_delta_rule(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                           cu_seqlens=None):
    """Reference Gated DeltaNet.

    Args:
        q, k: `[B, T, H, K]`; v: `[B, T, H, V]`; g (log-decay, <= 0), beta: `[B, T, H]`.
        scale: float multiplying q^T S.
        initial_state: `[N, H, K, V]` or None (zeros).
        output_final_state: return the state after the last token of each sequence.
        cu_seqlens: int `[N+1]` document offsets into the T axis (B == 1), or None (N = B).

    Returns:
        o `[B, T, H, V]` in the compute dtype (float64 stays float64, anything else runs in float32) and the
        final state `[N, H, K, V]` in the same dtype, or None.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (x.to(compute) for x in (q, k, v, g, beta))
    batch, _, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    if cu_seqlens is None:
        spans = [(b, 0, q.shape[1]) for b in range(batch)]
    else:
        bounds = cu_seqlens.tolist()
        spans = [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]
    outputs, finals = [], []
    for n, (b, start, end) in enumerate(spans):
        if initial_state is None:
            state = q.new_zeros(heads, key_dim, value_dim)
        else:
            state = initial_state[n].to(compute)
        o_n, state = _sequence_recurrence(q[b, start:end], k[b, start:end], v[b, start:end],
                                          g[b, start:end], beta[b, start:end], scale, state)
        outputs.append(o_n)
        finals.append(state)
    if cu_seqlens is None:
        o = torch.stack(outputs)
    else:
        o = torch.cat(outputs)[None]
    final_state = torch.stack(finals) if output_final_state else None
    return o, final_state
