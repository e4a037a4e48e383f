"""Blocked pure-PyTorch `local_attention`: the CPU training path (autograd by torch).

Queries are cut into blocks of C tokens. Query block b can only see

* the band: keys `[b*C - (W_max - 1), (b+1)*C)`, gathered for every block at once with `unfold` over a copy of
  the keys padded in front by `W_max - 1` rows, and
* the sink: the first `S_max` keys of each query's own document, gathered per query.

So scores, probabilities and their saved activations are `[T, C + W_max - 1 + S_max]` per head: O(T * (window +
sink)) memory and compute instead of O(T^2). A key that is both in the band range and in the sink is counted
once: the band part only admits keys at least `sink` tokens into the document. The exact per-head
window/sink and document rule are applied as a mask on top; every query keeps at least itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lctrain.kernels.local_attention.common import document_starts, per_head_spans

DEFAULT_BLOCK = 64


def chunk_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | torch.Tensor,
    sink: int | torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Banded softmax attention (inputs already validated; shapes as in `naive_local_attention`).

    q `[B, T, H, D]`, k `[B, T, Hkv, D]`, v `[B, T, Hkv, Dv]`; returns o `[B, T, H, Dv]` in q's dtype.
    """
    batch, length, heads, _ = q.shape
    group = heads // k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    windows, sinks = per_head_spans(window, sink, heads, q.device)
    # Spans longer than the sequence change nothing; clamping keeps the gathered band small.
    widest = int(windows.clamp(max=length).max())
    deepest = int(sinks.clamp(max=length).max())
    block = max(1, min(block, length))
    num_blocks = -(-length // block)
    pad = num_blocks * block - length
    band = block + widest - 1  # keys per query block

    qh = q.to(compute).transpose(1, 2)  # [B, H, T, D]
    kh = k.to(compute).repeat_interleave(group, dim=2).transpose(1, 2)
    vh = v.to(compute).repeat_interleave(group, dim=2).transpose(1, 2)
    starts = document_starts(cu_seqlens, batch, length, q.device)  # [B, T]
    query_index = torch.arange(length, device=q.device)

    # Band part: [B, H, n, C, band] scores of each query block against its own key range.
    q_blocks = F.pad(qh, (0, 0, 0, pad)).view(batch, heads, num_blocks, block, -1)
    k_band = F.pad(kh, (0, 0, widest - 1, pad)).unfold(2, band, block).transpose(-1, -2)  # [B, H, n, band, D]
    v_band = F.pad(vh, (0, 0, widest - 1, pad)).unfold(2, band, block).transpose(-1, -2)
    band_scores = (q_blocks @ k_band.transpose(-1, -2)).flatten(2, 3)[:, :, :length] * scale  # [B, H, T, band]
    key_index = (query_index // block * block)[:, None] - (widest - 1) + torch.arange(band, device=q.device)
    from_start = key_index[None] - starts[:, :, None]  # j - doc_start(i), [B, T, band]
    band_ok = ((from_start >= 0) & (key_index <= query_index[:, None]))[:, None]  # same document, causal
    band_ok = band_ok & ((query_index[:, None] - key_index)[None, None] < windows[None, :, None, None])
    band_ok = band_ok & (from_start[:, None] >= sinks[None, :, None, None])  # sink keys are counted below
    scores = band_scores.masked_fill(~band_ok, float("-inf"))

    if deepest > 0:
        # Sink part: the first `deepest` keys of each query's document, [B, H, T, S].
        sink_index = starts[:, :, None] + torch.arange(deepest, device=q.device)  # [B, T, S]
        gather = sink_index.clamp(max=length - 1).view(batch, 1, length * deepest, 1)
        k_sink = kh.gather(2, gather.expand(batch, heads, -1, kh.shape[-1])).view(batch, heads, length, deepest, -1)
        v_sink = vh.gather(2, gather.expand(batch, heads, -1, vh.shape[-1])).view(batch, heads, length, deepest, -1)
        sink_scores = torch.einsum("bhtd,bhtsd->bhts", qh, k_sink) * scale
        sink_ok = (sink_index <= query_index[:, None])[:, None]
        sink_ok = sink_ok & (torch.arange(deepest, device=q.device)[None, None, None] < sinks[None, :, None, None])
        scores = torch.cat([sink_scores.masked_fill(~sink_ok, float("-inf")), scores], dim=-1)

    probs = scores.softmax(dim=-1)
    band_probs = F.pad(probs[..., deepest:], (0, 0, 0, pad)).view(batch, heads, num_blocks, block, band)
    o = (band_probs @ v_band).flatten(2, 3)[:, :, :length]  # [B, H, T, Dv]
    if deepest > 0:
        o = o + torch.einsum("bhts,bhtsd->bhtd", probs[..., :deepest], v_sink)
    return o.transpose(1, 2).to(q.dtype)
