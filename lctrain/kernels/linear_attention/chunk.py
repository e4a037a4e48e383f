"""Chunked pure-PyTorch `linear_attention`: the CPU training path (autograd by torch).

Lightning-Attention-2 split. Inside a chunk of C tokens with inclusive cumulative log-gates
b_i = g_1 + ... + g_i (chunk-local), and S_0 the state entering the chunk:

    o_i   = scale * [ sum_{j<=i} exp(b_i - b_j) (q_i . k_j) v_j  +  exp(b_i) q_i^T S_0 ]     (intra + inter)
    S_C   = exp(b_C) S_0 + sum_j exp(b_C - b_j) k_j v_j^T                                    (state hand-off)

Every exponent is <= 0, so nothing overflows. The intra-chunk part, every chunk's state update k^T v and the inter
part q S_0 are single batched matmuls over all chunks; only the elementwise state hand-off walks the chunks. Packed
documents (`cu_seqlens`) are padded to whole chunks and walk side by side, each from its own initial state (see
kernels/varlen.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lctrain.kernels.linear_attention.common import per_token_log_decay, state_dtype_for
from lctrain.kernels.varlen import ChunkLayout, chunk_layout

DEFAULT_CHUNK_SIZE = 64


def chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked linear attention (inputs already validated).

    Args:
        q, k: `[B, T, H, K]`.  v: `[B, T, H, V]`.
        log_decay: None, `[H]` or `[B, T, H]`, values <= 0.
        scale: multiplies every output.
        initial_state: `[N, H, K, V]` or None (zeros).
        output_final_state: return the state after each sequence's last token.
        cu_seqlens: int `[N+1]` document offsets into the T axis (B == 1), or None (N = B).
        chunk_size: tokens per chunk C.
        cu_seqlens_cpu: the same offsets as an int32 CPU tensor (host metadata; avoids a device read).

    Returns:
        o `[B, T, H, V]` in q's dtype, and the final state `[N, H, K, V]` (float32; float64 for float64
        inputs) or None.
    """
    batch, length, heads, _ = q.shape
    g = per_token_log_decay(log_decay, batch, length, heads)
    if cu_seqlens is None:
        o, final = _chunk_rows(q, k, v, g, scale, initial_state, chunk_size)
    else:
        layout = chunk_layout(cu_seqlens, chunk_size, cu_seqlens_cpu)
        aligned = [layout.align(x) for x in (q, k, v)]
        g_aligned = None if g is None else layout.align(g)  # zero log-gate on padding: neutral
        num_docs = cu_seqlens.numel() - 1
        if initial_state is None:
            initial_state = q.new_zeros(num_docs, heads, q.shape[-1], v.shape[-1],
                                        dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        if layout.num_chunks == 0:  # only empty documents
            o, final = v.new_zeros(v.shape), initial_state
        else:
            o, final = _chunk_rows(*aligned, g_aligned, scale, initial_state, chunk_size, layout)
            o = layout.unalign(o)
    if not output_final_state:
        return o, None
    return o, final.to(state_dtype_for(q.dtype))


def _chunk_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    chunk_size: int,
    layout: ChunkLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked recurrence where every batch row is one sequence, or (with a chunk `layout`, B == 1) where the
    chunks of several chunk-aligned documents follow each other.

    q, k `[B, L, H, K]`, v `[B, L, H, V]`, g `[B, L, H]` or None, initial_state `[B or N, H, K, V]` or None.
    Returns o `[B, L, H, V]` (q's dtype) and the final state `[B or N, H, K, V]` (compute dtype).
    """
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    # bf16/fp16 inputs are computed in fp32 so the state never rounds to half precision.
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if layout is None:
        chunk_size = max(1, min(chunk_size, length))  # short sequences need no padding to a full chunk
    num_chunks = max(1, -(-length // chunk_size))
    pad = num_chunks * chunk_size - length

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # [B, L, H, D] -> [B, H, n, C, D]; padded tokens have k = v = 0 and g = 0, so they change nothing.
        x = F.pad(x.to(compute), (0, 0, 0, 0, 0, pad))
        return x.view(batch, num_chunks, chunk_size, heads, -1).permute(0, 3, 1, 2, 4)

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)
    if g is None:
        gc = qc.new_zeros(batch, heads, num_chunks, chunk_size)
    else:
        gc = to_chunks(g.unsqueeze(-1)).squeeze(-1)
    cum = gc.cumsum(dim=-1)  # b_i, [B, H, n, C]
    last = cum[..., -1:]  # b_C, [B, H, n, 1]

    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # Mask the exponent (not the product) so the upper triangle never computes exp of a positive number.
    gaps = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    scores = (qc @ kc.transpose(-1, -2)) * gaps.exp()  # [B, H, n, C, C]
    o_intra = scores @ vc

    q_from_start = qc * cum.exp().unsqueeze(-1)  # exp(b_i) q_i
    k_to_end = kc * (last - cum).exp().unsqueeze(-1)  # exp(b_C - b_j) k_j
    chunk_decay = last.squeeze(-1).exp()  # exp(b_C), [B, H, n]
    # Each chunk's state update, one batched matmul for all chunks; the walk below is elementwise only.
    updates = k_to_end.transpose(-1, -2) @ vc  # [B, H, n, K, V]
    if layout is not None:  # packed documents walk side by side, each from its own state (varlen.py's grid)
        if initial_state is None:
            initial_state = qc.new_zeros(layout.num_docs, heads, key_dim, value_dim)
        entering, state = _walk(layout.to_grid(updates[0], 0.0, dim=1), layout.to_grid(chunk_decay[0], 1.0, dim=1),
                                initial_state.to(compute).transpose(0, 1))
        entering, state = layout.from_grid(entering, dim=1).unsqueeze(0), state.transpose(0, 1)
    else:
        state0 = qc.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None \
            else initial_state.to(compute)
        entering, state = _walk(updates, chunk_decay, state0)
    o_inter = q_from_start @ entering  # [B, H, n, C, V]
    o = (o_intra + o_inter) * scale  # [B, H, n, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(batch, num_chunks * chunk_size, heads, value_dim)[:, :length]
    return o.to(q.dtype), state


def _walk(updates: torch.Tensor, decay: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S_{c+1} = decay_c S_c + updates_c over the chunk axis (-3 of updates [..., n, K, V], -1 of decay [..., n]).
    Returns the state entering every chunk [..., n, K, V] and the final state [..., K, V]."""
    entering = []
    # unbind once: indexing [..., c, :, :] in the loop would give each chunk a full-size gradient buffer (O(T^2))
    for update, gate in zip(updates.unbind(-3), decay.unbind(-1)):
        entering.append(state)
        state = torch.addcmul(update, gate[..., None, None], state)
    return torch.stack(entering, dim=-3), state
