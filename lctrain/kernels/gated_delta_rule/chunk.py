"""Chunked Gated DeltaNet in pure PyTorch (the CPU training path; autograd by torch).

Within a chunk of C tokens with entering state S_0 and cumulative log-gates G_t = g_1 + ... + g_t, the
recurrence S_t = exp(g_t) S_{t-1} + beta_t k_t u_t^T with u_t = v_t - exp(g_t) S_{t-1}^T k_t unrolls to a
unit lower-triangular system for delta_t = beta_t u_t (the WY/UT form of the Gated DeltaNet paper):

    (I + L) delta = beta V - diag(beta exp(G)) K S_0,   L_tj = beta_t (k_t . k_j) exp(G_t - G_j)  for j < t
    delta = U - W S_0,   U = A diag(beta) V,   W = A diag(beta exp(G)) K,   A = (I + L)^-1
    o_t   = scale (exp(G_t) q_t^T S_0 + sum_{j<=t} exp(G_t - G_j) (q_t . k_j) delta_j)
    S_C   = exp(G_C) S_0 + sum_j exp(G_C - G_j) k_j delta_j^T

Only the state hand-off runs sequentially over chunks (chunk_state.py: two matmuls per step, every row, document
and head at once); everything else, outputs and weight gradients included, is batched over all chunks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lctrain.kernels.gated_delta_rule.chunk_state import chunk_state_walk
from lctrain.kernels.varlen import chunk_layout

CHUNK_SIZE = 64


def _pad_time(x: torch.Tensor, padded_len: int) -> torch.Tensor:
    """Zero-pad dim 1 (time) of a `[B, T, ...]` tensor to `padded_len`."""
    extra = padded_len - x.shape[1]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, extra]
    return F.pad(x, pad)


class _UnitLowerSolve(torch.autograd.Function):
    """(I + L)^-1 rhs for strictly lower-triangular L `[..., C, C]`. The inverse is formed once (a triangular solve
    against the identity, no autograd); then forward and backward are plain batched matmuls:
    d rhs = A^-T dx, dL = -tril(d rhs x^T, -1). Half the cost of autograd through `solve_triangular`."""

    @staticmethod
    def forward(ctx, lower, rhs):
        eye = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device)
        inverse = torch.linalg.solve_triangular(lower + eye, eye.expand(lower.shape), upper=False,
                                                unitriangular=True)
        x = inverse @ rhs
        ctx.save_for_backward(inverse, x)
        return x

    @staticmethod
    def backward(ctx, d_x):
        inverse, x = ctx.saved_tensors
        d_rhs = inverse.transpose(-1, -2) @ d_x
        d_lower = -(d_rhs @ x.transpose(-1, -2)).tril_(-1)
        return d_lower, d_rhs


def _chunk_terms(q, k, v, g, beta, scale, chunk_size):
    """Everything that does not depend on the entering state, for all chunks at once.

    Inputs `[B, NC*C, H, ...]` (time already a multiple of C). Returns per-chunk tensors `[B, H, NC, ...]`:
    u, w (WY form), qk (decayed causal scores), q_gated, k_to_end and last_gate.
    """
    batch, padded, heads, _ = k.shape
    num_chunks = padded // chunk_size

    def chunks(x):  # [B, T, H, ...] -> [B, H, num_chunks, C, ...]
        x = x.reshape(batch, num_chunks, chunk_size, heads, *x.shape[3:])
        return x.transpose(1, 3).transpose(2, 3)

    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))
    cum_gate = g.cumsum(-1)  # G, [B, H, NC, C]
    gate_diff = cum_gate[..., :, None] - cum_gate[..., None, :]  # G_t - G_j
    idx = torch.arange(chunk_size, device=q.device)
    causal = idx[:, None] >= idx[None, :]
    strictly_lower = idx[:, None] > idx[None, :]
    # Mask before exp: above the diagonal G_t - G_j >= 0 and may overflow.
    decay = torch.exp(gate_diff.masked_fill(~causal, float("-inf")))  # [B, H, NC, C, C]

    lower = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay).masked_fill(~strictly_lower, 0.0)
    rhs = torch.cat([beta[..., None] * v, (beta * cum_gate.exp())[..., None] * k], dim=-1)
    solved = _UnitLowerSolve.apply(lower, rhs)
    value_dim = v.shape[-1]
    last_gate = cum_gate[..., -1]  # G_C, [B, H, NC]
    return {
        "u": solved[..., :value_dim], "w": solved[..., value_dim:],
        "qk": (q @ k.transpose(-1, -2)) * decay * scale,  # zero above the diagonal
        "q_gated": q * (scale * cum_gate.exp())[..., None],
        "k_to_end": k * torch.exp(last_gate[..., None] - cum_gate)[..., None],
        "last_gate": last_gate,
    }


def _outputs(terms, states, delta):
    """o = q_gated S_c + qk delta for every chunk at once: `[..., NC, C, V]`."""
    return terms["q_gated"] @ states + terms["qk"] @ delta


def _chunked_batch(q, k, v, g, beta, scale, state, chunk_size):
    """Equal-length sequences. q, k `[B, T, H, K]`, v `[B, T, H, V]`, g, beta `[B, T, H]`, state `[B, H, K, V]`.

    All rows walk their chunks together. Returns o `[B, T, H, V]` and the final state `[B, H, K, V]`.
    """
    batch, seq_len, heads, _ = k.shape
    if seq_len == 0:  # an empty document: no output, state passes through
        return v.new_zeros(v.shape), state
    num_chunks = -(-seq_len // chunk_size)
    padded = num_chunks * chunk_size
    # Padded tokens have g = 0 and beta = 0: they leave the state untouched and their outputs are dropped.
    q, k, v, g, beta = (_pad_time(x, padded) for x in (q, k, v, g, beta))
    terms = _chunk_terms(q, k, v, g, beta, scale, chunk_size)
    states, delta, final = chunk_state_walk(terms["u"], terms["w"], terms["k_to_end"], terms["last_gate"].exp(),
                                            state)
    o = _outputs(terms, states, delta)  # [B, H, NC, C, V]
    o = o.reshape(batch, heads, padded, v.shape[-1]).transpose(1, 2)[:, :seq_len]
    return o, final


def _chunked_packed(q, k, v, g, beta, scale, states, cu_seqlens, chunk_size, cu_seqlens_cpu=None):
    """Packed documents (B == 1): every document is padded to whole chunks, all chunks are prepared together, and
    the documents walk their chunks side by side on the chunk grid (see varlen.py), each from its own initial
    state. states `[N, H, K, V]`."""
    layout = chunk_layout(cu_seqlens, chunk_size, cu_seqlens_cpu)
    if layout.num_chunks == 0:
        return v.new_zeros(v.shape), states
    q, k, v, g, beta = (layout.align(x) for x in (q, k, v, g, beta))  # zero padding: g = 0, beta = 0 are neutral
    terms = {name: t[0] for name, t in _chunk_terms(q, k, v, g, beta, scale, chunk_size).items()}  # [H, NC, ...]
    # grid [H, N, grid_chunks, ...]; cells past a document's end: zero update, unit decay
    u, w, kt = (layout.to_grid(terms[name], 0.0, dim=1) for name in ("u", "w", "k_to_end"))
    decay = layout.to_grid(terms["last_gate"].exp(), 1.0, dim=1)
    grid_states, grid_delta, final = chunk_state_walk(u, w, kt, decay, states.transpose(0, 1))
    o = _outputs(terms, layout.from_grid(grid_states, dim=1), layout.from_grid(grid_delta, dim=1))  # [H, NC, C, V]
    o = o.reshape(1, o.shape[0], -1, o.shape[-1]).transpose(1, 2)
    return layout.unalign(o), final.transpose(0, 1)


def chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                           cu_seqlens=None, chunk_size: int = CHUNK_SIZE, cu_seqlens_cpu=None):
    """Chunked Gated DeltaNet.

    Args:
        q, k: `[B, T, H, K]`; v: `[B, T, H, V]`; g (log-decay, <= 0), beta: `[B, T, H]`.
        scale: float multiplying q^T S.
        initial_state: `[N, H, K, V]` or None (zeros).
        output_final_state: return the state after the last token of each sequence.
        cu_seqlens: int `[N+1]` document offsets into the T axis (B == 1), or None (N = B).
        chunk_size: tokens per chunk C.
        cu_seqlens_cpu: the same offsets as an int32 CPU tensor (host metadata; avoids a device read).

    Returns:
        o `[B, T, H, V]` and the final state `[N, H, K, V]` (or None), computed in float32, or float64 for
        float64 inputs.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (x.to(compute) for x in (q, k, v, g, beta))
    batch, _, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    num_seqs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is None:
        state = q.new_zeros(num_seqs, heads, key_dim, value_dim)
    else:
        state = initial_state.to(compute)
    if cu_seqlens is None:
        o, final = _chunked_batch(q, k, v, g, beta, scale, state, chunk_size)
    else:
        # Chunks never straddle a document boundary: documents are padded to whole chunks (see varlen.py).
        o, final = _chunked_packed(q, k, v, g, beta, scale, state, cu_seqlens, chunk_size, cu_seqlens_cpu)
    return o, (final if output_final_state else None)
