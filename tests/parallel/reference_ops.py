"""Token-by-token float64 references with the kernel op contract, used as ground truth (and as the `op=` of the
sequence-parallel functions when the real kernel package is not importable)."""
from __future__ import annotations

import torch


def _sequences(batch: int, length: int, cu_seqlens):
    """(row, start, end) of every sequence, in state order."""
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


def _recurrence(q, k, v, step, scale, initial_state, output_final_state, cu_seqlens):
    batch, length, heads, key_dim = q.shape
    scale = key_dim ** -0.5 if scale is None else scale
    rows = [[None] * length for _ in range(batch)]
    finals = []
    for n, (b, start, end) in enumerate(_sequences(batch, length, cu_seqlens)):
        state = (initial_state[n] if initial_state is not None
                 else q.new_zeros(heads, key_dim, v.shape[-1]))
        for t in range(start, end):
            state = step(state, b, t)
            rows[b][t] = scale * torch.einsum("hk,hkv->hv", q[b, t], state)
        finals.append(state)
    o = torch.stack([torch.stack(r) for r in rows])
    return o, (torch.stack(finals) if output_final_state else None)


def linear_attention(q, k, v, log_decay=None, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, backend=None):
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale q_t^T S_t."""
    def step(state, b, t):
        if log_decay is None:
            decay = 1.0
        elif log_decay.dim() == 1:
            decay = torch.exp(log_decay)[:, None, None]
        else:
            decay = torch.exp(log_decay[b, t])[:, None, None]
        return decay * state + k[b, t, :, :, None] * v[b, t, :, None, :]
    return _recurrence(q, k, v, step, scale, initial_state, output_final_state, cu_seqlens)


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, backend=None):
    """S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = scale q_t^T S_t."""
    def step(state, b, t):
        kt, bt = k[b, t], beta[b, t][:, None, None]
        k_state = torch.einsum("hk,hkv->hv", kt, state)
        decayed = torch.exp(g[b, t])[:, None, None] * (state - bt * kt[:, :, None] * k_state[:, None, :])
        return decayed + bt * kt[:, :, None] * v[b, t, :, None, :]
    return _recurrence(q, k, v, step, scale, initial_state, output_final_state, cu_seqlens)


def masked_attention(q, k, v, doc_ids, scale=None):
    """Causal + document-masked softmax attention over the full sequence. q `[B,T,H,D]`, k/v `[B,T,Hkv,D]`,
    doc_ids `[B,T]`."""
    heads, kv_heads = q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    length = q.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, dim=-1), v)


def document_causal_conv(x, weight, doc_ids):
    """Depthwise causal conv whose window stops at document starts. x `[B,T,D]`, weight `[D,W]` (weight[:, -1]
    multiplies the current token), doc_ids `[B,T]`."""
    width = weight.shape[1]
    out = torch.zeros_like(x)
    for shift in range(width):
        shifted = torch.zeros_like(x)
        same = torch.zeros_like(doc_ids, dtype=torch.bool)
        if shift == 0:
            shifted, same = x, torch.ones_like(same)
        else:
            shifted[:, shift:] = x[:, :-shift]
            same[:, shift:] = doc_ids[:, shift:] == doc_ids[:, :-shift]
        out = out + shifted * same[..., None] * weight[:, width - 1 - shift]
    return out
